"""The BTCV bundle end to end through `python -m monai.bundle`: train, resume, evaluate, infer, multi-GPU, export."""

import csv
import importlib
import importlib.util
import json
import math
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    BUNDLES,
    TINY,
    load_bundle_scripts,
    read_back_dicom_seg,
    run_bundle,
    synthetic_ct,
    write_encoder_file,
)
from monai.bundle import ConfigWorkflow, ckpt_export
from monai.transforms import LoadImage

BUNDLE = BUNDLES / "swin_unetr_btcv"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "inference.json"
MULTI_GPU, ENSEMBLE = CONFIGS / "multi_gpu_train.json", CONFIGS / "inference_ensemble.json"
BEST_DICE = re.compile(r"Key metric: val_mean_dice best value: ([0-9.]+)")


def loss_values(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"train_loss: ([0-9.]+)", log)]


@pytest.fixture(scope="module")
def trained(btcv_data, tmp_path_factory):
    """Two epochs of tiny training on the synthetic set, as a plain run (no run id: MONAI runs the config's `run`;
    the other tests name `training`); returns (run folder, process)."""
    out = tmp_path_factory.mktemp("btcv_run")
    proc = run_bundle(
        [TRAIN], dataset_dir=str(btcv_data), ckpt_dir=str(out / "models"), output_dir=str(out / "eval"),
        max_epochs=2, val_interval=1, learning_rate=1e-3, **TINY,
    )  # fmt: skip
    return out, proc


def test_training_writes_checkpoints_and_validates(trained):
    out, proc = trained
    log = proc.stdout + proc.stderr
    assert (out / "models" / "model.pt").is_file()
    assert (out / "models" / "checkpoint_epoch=2.pt").is_file()
    assert "Engine run finished" in log and not re.search(r"(training|validation): +\d+%\|", log)  # piped: no bar
    assert len(loss_values(log)) == 8 and all(math.isfinite(v) for v in loss_values(log))  # 4 cases x 2 epochs
    dice = [float(v) for v in BEST_DICE.findall(log)]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)
    assert list((out / "eval").glob("events.out.tfevents.*"))
    if torch.cuda.is_available():  # huge pages are for CPU training; a CUDA run leaves the setting alone
        assert "cpu_huge_pages" not in log
    else:
        assert "CPU tensors of 2 MB or more are backed by transparent huge pages" in log  # set before any allocation
        assert "cpu_memory_pool: freed memory stays in the process" in log
        assert "cpu_patches_per_pass: training runs the network on 1 patch at a time, one optimizer step" in log
    if torch.cuda.is_available():  # MONAI's own float16 AMP, which logs nothing
        assert "amp:" not in log
    else:  # bfloat16 autocast by default where the CPU has it, said either way
        assert re.search(r"amp: (the forward pass runs under bfloat16 autocast|this CPU has no native bfloat16)", log)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state["swinViT.patch_embed.proj.weight"].shape == (12, 1, 2, 2, 2)
    assert state["out.conv.conv.weight"].shape[0] == 14


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(trained, btcv_data, tmp_path):
    out, _ = trained
    shutil.copytree(out / "models", tmp_path / "models")
    before = (tmp_path / "models" / "checkpoint_epoch=2.pt").read_bytes()
    proc = run_bundle(
        [TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), max_epochs=3, val_interval=1, resume=True, **TINY,
        **{"loss#lambda_ce": "$float('nan')"},  # a loss that is NaN from the first step of epoch 3
    )  # fmt: skip
    assert proc.returncode != 0
    first = next(line for line in proc.stderr.splitlines() if re.match(r"^\w+(Error|Exception):", line))
    assert first.startswith("FloatingPointError: training loss is nan at epoch 3, iteration 9")
    assert str(tmp_path / "models") in first
    # nothing written after the NaN: the epoch-2 checkpoint is still the latest, byte for byte
    assert sorted(p.name for p in (tmp_path / "models").glob("checkpoint_*")) == ["checkpoint_epoch=2.pt"]
    assert (tmp_path / "models" / "checkpoint_epoch=2.pt").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(btcv_data, tmp_path):
    proc = run_bundle(
        [TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "empty"),
        output_dir=str(tmp_path / "eval"), max_epochs=1, resume=True, **TINY,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "resume=true but ckpt_dir" in proc.stderr


def test_evaluate_writes_per_case_metrics(trained, btcv_data):
    out, _ = trained
    proc = run_bundle(
        [TRAIN, EVALUATE], dataset_dir=str(btcv_data), ckpt_dir=str(out / "models"),
        output_dir=str(out / "evaluation"), val_fraction=0.4, **TINY,
    )  # fmt: skip
    assert re.search(r"val_mean_dice: [0-9.]+", proc.stdout + proc.stderr)
    for metric in ("val_mean_dice", "val_hd95", "val_nsd"):
        with open(out / "evaluation" / f"{metric}_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename"] + [f"class{i}" for i in range(13)] + ["mean"]
        assert [r[0].rsplit("/", 1)[-1] for r in rows[1:]] == ["img0004.nii.gz", "img0005.nii.gz"]
        assert all(len(r) == 15 for r in rows[1:])
    with open(out / "evaluation" / "metrics.csv") as f:
        summary = dict(csv.reader(f))
    assert set(summary) == {"val_mean_dice", "val_hd95", "val_nsd"}
    assert 0.0 <= float(summary["val_mean_dice"]) <= 1.0


def test_inference_keeps_input_geometry(trained, tmp_path):
    out, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    image, _, affine = synthetic_ct.make_case(seed=21, shape=(101, 87, 30))
    # Axes permuted to S, L, P: not RAS and no side a multiple of 32.
    permuted, permuted_affine = np.transpose(image, (2, 0, 1)), affine[:, [2, 0, 1, 3]]
    synthetic_ct.save_nifti(permuted, permuted_affine, str(images / "case_sla.nii.gz"))
    synthetic_ct.write_dicom_series(image, affine, str(images / "dicom_case"), suffix="")  # as PACS exports
    (tmp_path / "pred").mkdir()
    stale = tmp_path / "pred" / ".partial-999999999-case_sla_seg.nii.gz"  # left by a killed run (no such process)
    stale.write_bytes(b"half")
    proc = run_bundle(
        [INFERENCE], dataset_dir=str(images), ckpt_dir=str(out / "models"), output_dir=str(tmp_path / "pred"),
        write_dicom_seg=True, **TINY,
    )  # fmt: skip
    assert not stale.exists() and f"removed {stale}" in proc.stdout + proc.stderr
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert written == ["case_sla_seg.nii.gz", "dicom_case_seg.dcm", "dicom_case_seg.nii.gz"]
    assert "no DICOM SEG for case_sla.nii.gz: its input is not DICOM" in proc.stdout + proc.stderr
    seg = nib.load(tmp_path / "pred" / "case_sla_seg.nii.gz")
    assert nib.aff2axcodes(permuted_affine) == ("S", "L", "P")
    assert seg.shape == permuted.shape
    np.testing.assert_allclose(seg.affine, permuted_affine, atol=1e-4)
    labels = np.asarray(seg.dataobj)
    assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() <= 13

    dicom_seg = nib.load(tmp_path / "pred" / "dicom_case_seg.nii.gz")
    dicom_image = LoadImage(image_only=True)(str(images / "dicom_case"))
    assert dicom_seg.shape == tuple(dicom_image.shape)
    np.testing.assert_allclose(dicom_seg.affine, dicom_image.affine.numpy(), atol=1e-4)
    # the DICOM SEG holds the same labels as the NIfTI, each frame on the source image of its slice
    names, numbers, _, _ = read_back_dicom_seg(tmp_path / "pred" / "dicom_case_seg.dcm", images / "dicom_case")
    channel_def = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    present = [int(v) for v in np.unique(np.asarray(dicom_seg.dataobj)) if v > 0]
    assert present and names == [channel_def["pred"]["channel_def"][str(v)] for v in present]
    nifti_frames = np.stack([np.asarray(dicom_seg.dataobj)[:, :, k].T for k in range(dicom_seg.shape[2])])
    np.testing.assert_array_equal(np.array([0] + present)[numbers], nifti_frames)


def test_fold_ensemble_names_a_missing_fold_first_and_with_tta_predicts_dicom_like_one_model(trained, tmp_path):
    """`inference_ensemble.json` with `tta`, DICOM in and DICOM SEG out: a missing fold of the default five under
    ckpt_dir stops the run before any case is read; copies of one model give that model's mirrored prediction (two
    copies here: the five default folds are averaged in `test_tta_ensemble.py`)."""
    out, _ = trained
    images = tmp_path / "images"
    image, _, affine = synthetic_ct.make_case(seed=22, shape=(100, 90, 24))
    synthetic_ct.write_dicom_series(image, affine, str(images / "series"))
    folds = tmp_path / "folds"
    for fold in range(4):
        (folds / f"fold{fold}").mkdir(parents=True)
        shutil.copy(out / "models" / "model.pt", folds / f"fold{fold}" / "model.pt")
    settings = dict(dataset_dir=str(images), write_dicom_seg=True, tta=True, output_dir=str(tmp_path / "e"), **TINY)
    proc = run_bundle([INFERENCE, ENSEMBLE], check=False, ckpt_dir=str(folds), **settings)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(f"checkpoints: 1 of 5 missing: {folds / 'fold4' / 'model.pt'}"), last
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())

    copies = [str(folds / f"fold{fold}" / "model.pt") for fold in (0, 1)]
    proc = run_bundle([INFERENCE, ENSEMBLE], ckpt_dir=str(folds), checkpoints=copies, **settings)
    assert "each window is the mean probability of 2 models" in proc.stdout + proc.stderr
    assert "each case is predicted 8 times" in proc.stdout + proc.stderr
    run_bundle([INFERENCE], ckpt_dir=str(out / "models"), **dict(settings, output_dir=str(tmp_path / "one")))
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["series_seg.dcm", "series_seg.nii.gz"]
    ensemble = np.asarray(nib.load(tmp_path / "e" / "series_seg.nii.gz").dataobj)
    single = np.asarray(nib.load(tmp_path / "one" / "series_seg.nii.gz").dataobj)
    assert ensemble.shape == image.shape and (ensemble == single).mean() >= 0.9999  # float sums may tie-break apart


@pytest.mark.parametrize("bundle", ["swin_unetr_btcv", "swin_unetr_msd"])
def test_tensorrt_config_compiles_the_network_with_monai_after_its_check(bundle):
    """`inference_trt.json` over `inference.json`: MONAI's `trt_compile` of the network, its engine keyed to the
    checkpoint (rebuilt when `model.pt` is newer), float16 when `amp`, batches up to `sw_batch_size`; and the
    TensorRT check runs before the engine is built."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "inference_trt.json")])
    assert parser["network"] == "$trt_compile(@network_def.to(@device), @ckpt_dir + '/model.pt', args=@trt_args)"
    assert "$from monai.networks import trt_compile" in parser["imports"]
    parser["device"], parser["amp"], parser["sw_batch_size"] = "$torch.device('cpu')", True, 4
    assert parser.get_parsed_content("trt_args") == {"precision": "fp16", "dynamic_batchsize": [1, 4, 4]}
    parser["amp"] = False
    assert parser.get_parsed_content("trt_args", lazy=False)["precision"] == "fp32"
    assert parser["run"][-2:] == ["$@tensorrt_check", "$@evaluator.run()"]
    assert parser["run"][:-2] == json.loads((configs / "inference.json").read_text())["run"][:-1]


def test_tensorrt_inference_without_a_gpu_stops_with_one_clear_line(trained, tmp_path):
    out, _ = trained
    proc = run_bundle(
        [INFERENCE, CONFIGS / "inference_trt.json"], check=False, dataset_dir=str(out / "no_images_needed"),
        ckpt_dir=str(out / "models"), output_dir=str(tmp_path / "pred"), **TINY,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("inference_trt.json needs a CUDA GPU, but device is cpu; use inference.json here."), last
    assert not (tmp_path / "pred").exists() and not list((out / "models").glob("*.plan"))


def test_tensorrt_check_names_the_missing_packages(monkeypatch):
    load_bundle_scripts("swin_unetr_btcv")
    checks = importlib.import_module("scripts.checks")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorrt" else real_find_spec(name))
    with pytest.raises(ImportError, match="inference_trt.json needs tensorrt(, polygraphy)?(, onnx)?: pip install"):
        checks.check_tensorrt("cuda:0")


def test_roi_size_not_divisible_by_32_fails_before_training(btcv_data, tmp_path):
    proc = run_bundle(
        [TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "m"),
        **dict(TINY, roi_size=[80, 64, 64]),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "roi_size=[80, 64, 64] is not divisible by 32" in proc.stderr
    assert "Epoch: 1" not in proc.stdout + proc.stderr


def test_lower_case_false_on_the_command_line_is_an_error_not_true(btcv_data, tmp_path):
    """`--amp false` reaches the config as the text 'false', which Python would treat as true."""
    proc = run_bundle(
        [TRAIN], check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "o"),
        **dict(TINY, amp="false"),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "amp must be True or False, got 'false': on the command line write --amp False" in proc.stderr
    assert "Epoch: 1" not in proc.stdout + proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist or is not a folder"),
    ("empty", "imagesTr holds no NIfTI images"),
    ("unlabelled", "have no label in labelsTr: img0002.nii.gz"),
    ("label_17", "label0003.nii.gz' holds values [14, 15, 16, 17] outside 0..13"),
])  # fmt: skip
def test_bad_data_is_a_clear_error(breakage, message, tmp_path):
    data = tmp_path / "data"
    synthetic_ct.generate(str(data), num_train=3, num_test=0, shape=(48, 44, 12))
    if breakage == "missing":
        shutil.rmtree(data)
    elif breakage == "empty":
        shutil.rmtree(data / "imagesTr")
        (data / "imagesTr").mkdir()
    elif breakage == "unlabelled":
        (data / "labelsTr" / "label0002.nii.gz").unlink()
    else:
        path = data / "labelsTr" / "label0003.nii.gz"
        label = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj) + 4, label.affine), path)
    proc = run_bundle([TRAIN], "training", check=False, dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"), **TINY)
    assert proc.returncode != 0
    first_error = next(line for line in proc.stderr.splitlines() if re.match(r"^\w+(Error|Exception):", line))
    assert message in first_error, first_error


def test_multi_gpu_config_runs_two_processes_on_cpu(btcv_data, tmp_path):
    """Two patches a step, which a CPU runs one per forward/backward pass, DDP synchronising gradients once; only
    rank 0 logs (the other ranks print warnings and errors only)."""
    run_bundle(
        [TRAIN, MULTI_GPU], "training", torchrun=2, rank_logs=tmp_path / "ranks", dataset_dir=str(btcv_data),
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), max_epochs=1, val_interval=1,
        val_fraction=0.4, **dict(TINY, num_samples=2),
    )  # fmt: skip
    (rank0,), (rank1,) = (list((tmp_path / "ranks").glob(f"*/attempt_0/{rank}")) for rank in (0, 1))
    log, other = ("".join(p.read_text() for p in folder.glob("std*.log")) for folder in (rank0, rank1))
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
    # 3 training cases shared by 2 ranks (padded to 4): each rank runs 2 iterations; only rank 0 logs them.
    assert len(loss_values(log)) == 2 and "input summary" in log and "Saved checkpoint" in log
    # MONAI logs its logging set-up before the config can act; nothing else at INFO
    info = [line for line in other.splitlines() if " - INFO - " in line]
    assert len(info) == 1 and "Setting logging properties based on config" in info[0], info
    writers = {p.name.split(".")[-2] for p in (tmp_path / "eval").glob("events.out.tfevents.*")}
    assert len(writers) == 1, "only rank 0 writes TensorBoard logs"


@pytest.mark.parametrize("bundle", ["swin_unetr_btcv", "swin_unetr_msd", "swin_unetr_pretrain"])
def test_fewer_validation_cases_than_processes_is_said_before_training(bundle):
    """MONAI's DistributedSampler stops such a run once it has started; the check says it first, with the remedy."""
    load_bundle_scripts(bundle)
    from scripts.checks import check_cases_per_process

    assert check_cases_per_process(2, "raise --val_fraction", world_size=2) == 2
    assert check_cases_per_process(1, "raise --val_fraction") == 1  # one process, not distributed
    with pytest.raises(
        ValueError, match=r"^1 validation case\(s\) for 2 processes: .* raise --val_fraction, or start at most 1"
    ):
        check_cases_per_process(1, "raise --val_fraction", world_size=2)
    multi_gpu = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
    assert multi_gpu["validate#sampler"]["_requires_"] == "@validate#cases_check"
    assert multi_gpu["validate#cases_check"]["num_cases"] == "$len(@validate#dataset)"
    assert "$logging.disable(logging.INFO) if dist.get_rank() > 0 else None" in multi_gpu["+initialize"]


@pytest.mark.parametrize("workflow_type, config", [("train", TRAIN), ("infer", INFERENCE)])
def test_workflow_properties_are_complete(workflow_type, config, btcv_data):
    load_bundle_scripts("swin_unetr_btcv")  # the parser locates `scripts.*` lazily
    workflow = ConfigWorkflow(
        config_file=str(config), meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type, num_workers=0, dataset_dir=str(btcv_data),
    )  # fmt: skip
    workflow.initialize()
    assert not workflow.check_properties()
    assert workflow.bundle_root == str(BUNDLE)


def test_torchscript_export_matches_eager(trained, tmp_path):
    out, _ = trained
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts_path), ckpt_file=str(out / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"), config_file=str(INFERENCE), use_trace=True,
        input_shape=[1, 1, 64, 64, 64], feature_size=12,
    )  # fmt: skip
    scripted = torch.jit.load(str(ts_path))
    from monai.networks.nets import SwinUNETR

    eager = SwinUNETR(1, 14, feature_size=12)
    eager.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    eager.eval()
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-4, rtol=1e-4)


def test_pretrained_encoder_is_loaded_into_fine_tuning(btcv_data, tmp_path):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(5)
    source = SwinUNETR(1, 14, feature_size=12)
    write_encoder_file(source, tmp_path / "model_swinvit.pt")
    proc = run_bundle(
        [TRAIN], "training", dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), max_epochs=1, val_interval=1, use_pretrained=True,
        pretrained_path=str(tmp_path / "model_swinvit.pt"), learning_rate=0.0, num_train_cases=1, **TINY,
    )  # fmt: skip
    assert re.search(r"loaded 126 of 126 encoder tensors from .*model_swinvit.pt", proc.stdout + proc.stderr)
    # learning rate 0: the saved network still holds the pre-trained encoder exactly
    saved = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    for key, value in source.state_dict().items():
        if key.startswith("swinViT."):
            torch.testing.assert_close(saved[key], value)


def test_mismatched_pretrained_file_is_refused(btcv_data, tmp_path):
    from monai.networks.nets import SwinUNETR

    write_encoder_file(SwinUNETR(1, 14, feature_size=24), tmp_path / "f24.pt")
    proc = run_bundle(
        [TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        use_pretrained=True, pretrained_path=str(tmp_path / "f24.pt"), **TINY,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "f24.pt' does not match the network" in proc.stderr
    assert not (tmp_path / "models").exists()
