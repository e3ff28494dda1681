"""The bundles inside MONAI Label, with the real `monailabel` package: bundle inference on NIfTI, bundle training."""

import json
import shutil
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY, run_bundle, synthetic_ct
from monai.networks.nets import SwinUNETR
from synthetic_msd import generate_task
from test_bundle_conventions import SEGMENTATION_BUNDLES


def _stand_in_for_torchvision() -> None:
    """monailabel.transform.post imports torchvision.utils (make_grid, save_image) at module level for 2D helpers
    that bundle tasks never call. PyPI's torchvision does not load beside the CPU build of torch 2.13 this project
    installs, so a module whose two functions fail loudly stands in for it when torchvision is absent."""
    import importlib

    try:
        importlib.import_module("torchvision.utils")
    except ImportError:

        def unavailable(*_, **__):
            raise RuntimeError("torchvision is not installed; MONAI Label's 2D helpers are unavailable")

        utils = types.ModuleType("torchvision.utils")
        utils.make_grid = utils.save_image = unavailable
        package = types.ModuleType("torchvision")
        package.utils = utils
        sys.modules.update({"torchvision": package, "torchvision.utils": utils})


_stand_in_for_torchvision()
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask  # noqa: E402

TINY_NETWORK = {"feature_size": 12, "roi_size": [64, 64, 64], "num_workers": 0}


def monai_label_app_bundle(source, target, in_channels: int, out_channels: int):
    """A bundle folder as a MONAI Label app holds it: configs as shipped (tiny network for CPU) and models/model.pt."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("eval", "*.pt", "__pycache__"))
    for name in ("inference.json", "train.json"):
        path = target / "configs" / name
        config = json.loads(path.read_text())
        config.update({k: v for k, v in TINY_NETWORK.items() if k in config})
        path.write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels, out_channels, feature_size=12).state_dict(), target / "models" / "model.pt")
    return target


def write_image(path, channels: int = 1):
    """A non-RAS, non-isotropic NIfTI (channels on a 4th axis, as the Decathlon stores them)."""
    image, _, affine = synthetic_ct.make_case(seed=8, shape=(70, 64, 26))
    volume = np.stack([image.astype(np.float32) + 100 * c for c in range(channels)], -1) if channels > 1 else image
    permuted = np.moveaxis(volume, 2, 0)  # S, L, P orientation
    synthetic_ct.save_nifti(permuted, affine[:, [2, 0, 1, 3]], str(path))
    return path


def infer_with_monai_label(bundle_dir, image_path):
    task = BundleInferTask(str(bundle_dir), conf={})
    assert task.valid, f"MONAI Label did not accept {bundle_dir}"
    label_file, _ = task({"image": str(image_path), "device": "cpu"})
    return task, nib.load(label_file)


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_bundle_inference_task_segments_a_nifti(bundle, tmp_path):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    classes = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    app_bundle = monai_label_app_bundle(BUNDLES / bundle, tmp_path / bundle, 1, len(classes))
    image_path = write_image(tmp_path / "case.nii.gz")
    task, seg = infer_with_monai_label(app_bundle, image_path)
    assert task.labels == {name: int(k) for k, name in classes.items() if name != "background"}
    image = nib.load(image_path)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-3)
    assert np.asarray(seg.dataobj).max() < len(classes)


def test_task_specialised_msd_bundle_serves_its_labels_in_monai_label(tmp_path):
    """`run task_bundle` for the 4-channel BrainTumour task: MONAI Label sees its labels and segments a 4D NIfTI."""
    specialised = tmp_path / "task01"
    run_bundle([BUNDLES / "swin_unetr_msd" / "configs" / "task_bundle.json"], task="Task01_BrainTumour",
               target_dir=str(specialised))  # fmt: skip
    app_bundle = monai_label_app_bundle(specialised, tmp_path / "app", 4, 4)
    task, seg = infer_with_monai_label(app_bundle, write_image(tmp_path / "brain.nii.gz", channels=4))
    assert task.labels == {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert seg.shape == (26, 70, 64)


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_bundle_training_task_runs_with_monai_label_overrides(bundle, tmp_path):
    """MONAI Label's BundleTrainTask sets max epochs, the train/validation `data`, device and bundle_root."""
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    num_classes = len(meta["network_data_format"]["outputs"]["pred"]["channel_def"])
    app_bundle = monai_label_app_bundle(BUNDLES / bundle, tmp_path / bundle, 1, num_classes)
    if bundle == "swin_unetr_msd":
        data = generate_task(str(tmp_path / "data"), "Task09_Spleen", num_train=3, num_test=0, shape=(70, 64, 40))
    else:
        data = synthetic_ct.generate(str(tmp_path / "data"), layout="msd", num_train=3, num_test=0, shape=(80, 74, 28))
    cases = json.loads((tmp_path / "data" / "dataset.json").read_text())["training"]
    cases = [{k: f"{data}/{v}" for k, v in case.items()} for case in cases]
    task = BundleTrainTask(str(app_bundle), conf={})
    const = BundleConstants()
    handlers = task.bundle_config.get(const.key_train_handlers(), [])
    overrides = {
        const.key_bundle_root(): str(app_bundle),
        const.key_train_trainer_max_epochs(): 1,
        const.key_train_dataset_data(): cases[:2],
        const.key_validate_dataset_data(): cases[2:],
        const.key_device(): torch.device("cpu"),
        const.key_train_handlers(): handlers,
        "num_samples": TINY["num_samples"], "use_checkpoint": False, "val_interval": 1,
    }  # fmt: skip
    # MONAI Label's "pretrained" option off: a fresh run, which must not replace the app's model.pt unasked
    with pytest.raises(RuntimeError) as refused:
        task.run_single_gpu({"run_id": "run"}, dict(overrides))
    assert "already holds ['model.pt']" in str(refused.value.__cause__)
    assert not (app_bundle / "models" / "checkpoint_epoch=1.pt").exists()
    # its default ("pretrained" on) adds a loader of models/model.pt, as its __call__ does: training continues it
    task._load_checkpoint(str(app_bundle / "models" / "model.pt"), True, handlers)
    task.run_single_gpu({"run_id": "run"}, overrides)
    assert (app_bundle / "models" / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(app_bundle / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 2  # the two cases MONAI Label gave, not the bundle's own data list
