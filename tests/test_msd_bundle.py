"""The MSD bundle end to end: one bundle, a task file per Decathlon task, on synthetic task folders."""

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY, load_bundle_scripts, run_bundle, verify_bundle_metadata, write_encoder_file
from monai.bundle import ConfigParser, ConfigWorkflow
from synthetic_msd import generate_task

BUNDLE = BUNDLES / "swin_unetr_msd"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "inference.json"
TASK_FILES = sorted((CONFIGS / "tasks").glob("Task*.json"))

# (task, synthetic shape, synthetic spacing): CT resampled to the task spacing, 4D MRI with 4 and 2 channels, and
# Hippocampus-sized volumes smaller than the 64^3 patch.
CASES = {
    "Task09_Spleen": ((120, 110, 36), (0.8, 0.8, 2.5)),
    "Task01_BrainTumour": ((64, 60, 40), (1.0, 1.0, 1.0)),
    "Task04_Hippocampus": ((34, 50, 36), (1.0, 1.0, 1.0)),
}


def task_file(task: str):
    return CONFIGS / "tasks" / f"{task}.json"


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if re.match(r"^\w+(Error|Exception):", line))


def test_all_ten_tasks_have_a_task_file():
    assert [p.stem.split("_")[0] for p in TASK_FILES] == [f"Task{i:02d}" for i in range(1, 11)]


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.stem)
def test_task_file_builds_its_network(path):
    """Every task file parses over train.json and builds a network with its declared channels and classes."""
    load_bundle_scripts("swin_unetr_msd")
    task = json.loads(path.read_text())
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(path)])
    parser["feature_size"] = 12
    assert parser.get_parsed_content("task") == path.stem
    assert parser.get_parsed_content("roi_size_check") == parser["roi_size"]  # patch sides divisible by 32
    assert len(parser.get_parsed_content("modality_transforms")) == 2
    net = parser.get_parsed_content("network_def")
    assert net.swinViT.patch_embed.proj.in_channels == len(task["modality"])
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, len(task["modality"]), 64, 64, 64))
    assert out.shape == (1, len(task["labels"]), 64, 64, 64)


@pytest.fixture(scope="module", params=list(CASES))
def task_run(request, tmp_path_factory):
    """A synthetic folder for the task, and one epoch of tiny training on fold 0; returns (task, data, run dir)."""
    task = request.param
    shape, spacing = CASES[task]
    data = tmp_path_factory.mktemp(task) / task
    generate_task(str(data), task, num_train=5, num_test=1, shape=shape, spacing=spacing, seed=3)
    out = tmp_path_factory.mktemp(f"{task}_run")
    proc = run_bundle(
        [TRAIN, task_file(task)], "training", dataset_dir=str(data), ckpt_dir=str(out / "models"),
        output_dir=str(out / "eval"), max_epochs=1, val_interval=1, learning_rate=1e-3, **TINY,
    )  # fmt: skip
    return task, data, out, proc.stdout + proc.stderr


def test_task_trains_one_epoch(task_run):
    task, _, out, log = task_run
    labels = json.loads(task_file(task).read_text())["labels"]
    assert len(re.findall(r"train_loss: [0-9.]+", log)) == 4  # 5 cases, fold 0 validates 1
    assert re.search(r"val_mean_dice best value: [0-9.]+", log)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state["out.conv.conv.weight"].shape[0] == len(labels)


def test_task_evaluates_dice_and_nsd_per_class(task_run):
    task, data, out, _ = task_run
    num_foreground = len(json.loads(task_file(task).read_text())["labels"]) - 1
    run_bundle(
        [TRAIN, EVALUATE, task_file(task)], dataset_dir=str(data), ckpt_dir=str(out / "models"),
        output_dir=str(out / "evaluation"), **TINY,
    )  # fmt: skip
    for metric in ("val_mean_dice", "val_nsd"):
        with open(out / "evaluation" / f"{metric}_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename"] + [f"class{i}" for i in range(num_foreground)] + ["mean"]
        assert [r[0].rsplit("/", 1)[-1] for r in rows[1:]] == [f"{task.split('_', 1)[1].lower()}_001.nii.gz"]
        assert all(0.0 <= float(v) <= 1.0 for v in rows[1][1:] if v != "nan")


def test_task_inference_keeps_input_geometry(task_run):
    task, data, out, _ = task_run
    run_bundle(
        [INFERENCE, task_file(task)], dataset_dir=str(data), ckpt_dir=str(out / "models"),
        output_dir=str(out / "pred"), **TINY,
    )  # fmt: skip
    (image_path,) = (data / "imagesTs").glob("*.nii.gz")
    image = nib.load(image_path)
    seg = nib.load(out / "pred" / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
    assert seg.shape == image.shape[:3]
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    values = np.unique(np.asarray(seg.dataobj))
    assert values.min() >= 0 and values.max() < len(json.loads(task_file(task).read_text())["labels"])


def test_folds_are_deterministic_disjoint_and_cover_all_cases(tmp_path):
    load_bundle_scripts("swin_unetr_msd")
    from scripts.decathlon import fold_split

    cases = [{"image": f"img{i:02d}", "label": f"lbl{i:02d}"} for i in range(12)]
    folds = [fold_split(list(reversed(cases)), fold) for fold in range(5)]
    validation = [c["image"] for f in folds for c in f["validation"]]
    assert sorted(validation) == [c["image"] for c in cases]  # each case validates exactly once
    assert all(not {c["image"] for c in f["training"]} & {c["image"] for c in f["validation"]} for f in folds)
    assert [c["image"] for c in folds[1]["validation"]] == ["img01", "img06", "img11"]
    assert fold_split(cases, 1) == folds[1]
    with pytest.raises(ValueError, match="fold must lie in 0..4, got 5"):
        fold_split(cases, 5)


def test_num_train_cases_keeps_the_first_cases_of_the_fold(tmp_path):
    load_bundle_scripts("swin_unetr_msd")
    from scripts.decathlon import build_task_datalist

    data = tmp_path / "Task05_Prostate"
    generate_task(str(data), "Task05_Prostate", num_train=6, num_test=0, shape=(24, 20, 6), spacing=(0.625, 0.625, 3.6))
    task = json.loads(task_file("Task05_Prostate").read_text())
    kwargs = dict(dataset_dir=str(data), task="Task05_Prostate", modality=task["modality"], labels=task["labels"])
    every = build_task_datalist(**kwargs, fold=1)
    fewer = build_task_datalist(**kwargs, fold=1, num_train_cases=2)
    assert fewer["training"] == every["training"][:2] and len(every["training"]) == 5
    assert fewer["validation"] == every["validation"]
    with pytest.raises(ValueError, match="num_train_cases is 6 but the training split holds only 5 cases"):
        build_task_datalist(**kwargs, fold=1, num_train_cases=6)


@pytest.mark.parametrize("breakage, message", [
    ("missing_folder", "dataset_dir '{data}' does not exist or is not a folder"),
    ("wrong_task", "task 'Task01_BrainTumour' does not match {data}/dataset.json: its modality is"),
    ("wrong_channels", "prostate_002.nii.gz' has 3 channel(s) but the bundle expects 2"),
])  # fmt: skip
def test_bad_task_folder_is_a_clear_error(breakage, message, tmp_path):
    data = tmp_path / "Task05_Prostate"
    generate_task(str(data), "Task05_Prostate", num_train=5, num_test=0, shape=(40, 36, 8), spacing=(0.625, 0.625, 3.6))
    task = "Task05_Prostate"
    if breakage == "missing_folder":
        data = tmp_path / "nowhere"
    elif breakage == "wrong_task":
        task = "Task01_BrainTumour"
    else:
        path = data / "imagesTr" / "prostate_002.nii.gz"
        image = nib.load(path)
        three = np.concatenate([np.asarray(image.dataobj), np.asarray(image.dataobj)[..., :1]], axis=-1)
        nib.save(nib.Nifti1Image(three, image.affine), path)
    proc = run_bundle(
        [TRAIN, task_file(task)], "training", check=False, dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"), **TINY
    )
    assert proc.returncode != 0
    assert message.format(data=data) in first_error(proc.stderr), first_error(proc.stderr)
    assert "train_loss" not in proc.stdout + proc.stderr


def test_pretrained_encoder_is_adapted_to_four_channels(tmp_path):
    from monai.networks.nets import SwinUNETR

    load_bundle_scripts("swin_unetr_msd")
    from scripts.pretrained import load_encoder

    torch.manual_seed(0)
    source = SwinUNETR(1, 2, feature_size=12)
    write_encoder_file(source, tmp_path / "model_swinvit.pt")
    target = SwinUNETR(4, 4, feature_size=12)
    assert load_encoder(target, str(tmp_path / "model_swinvit.pt")) == 126
    for key, value in source.state_dict().items():
        if key.startswith("swinViT.") and key != "swinViT.patch_embed.proj.weight":
            torch.testing.assert_close(target.state_dict()[key], value)
    # four identical channels give the single-channel encoder's features: kernel / channels, summed over channels
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            target.swinViT(x.repeat(1, 4, 1, 1, 1))[-1], source.swinViT(x)[-1], atol=1e-5, rtol=1e-4
        )


def test_task_bundle_is_a_plain_bundle_for_the_task(tmp_path):
    """`run task_bundle` writes a bundle whose own inference config and metadata serve the task (MONAI Label)."""
    from monai.networks.nets import SwinUNETR

    task, target = "Task01_BrainTumour", tmp_path / "task01_bundle"
    data = generate_task(str(tmp_path / task), task, num_train=0, num_test=1, shape=(40, 36, 30))
    torch.save(SwinUNETR(4, 4, feature_size=12).state_dict(), tmp_path / "model.pt")
    run_bundle([CONFIGS / "task_bundle.json"], task=task, target_dir=str(target), model_file=str(tmp_path / "model.pt"))
    meta = json.loads((target / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 4 and fmt["inputs"]["image"]["modality"] == "MR"
    assert fmt["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "edema",
        "2": "non-enhancing tumor",
        "3": "enhancing tumour",
    }
    verify_bundle_metadata(target / "configs" / "metadata.json", tmp_path)
    inference = json.loads((target / "configs" / "inference.json").read_text())
    assert inference["task"] == task and inference["modality_transforms"] == "@mri_transforms"
    assert sorted(p.name for p in (target / "models").glob("*.pt")) == ["model.pt"]
    # the copy alone, without the task file, segments the task's images
    run_bundle([target / "configs" / "inference.json"], dataset_dir=data, output_dir=str(tmp_path / "pred"), **TINY)
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1
    proc = run_bundle([CONFIGS / "task_bundle.json"], check=False, task=task, target_dir=str(target))
    assert "already exists" in first_error(proc.stderr)


@pytest.mark.parametrize("workflow_type, config", [("train", TRAIN), ("infer", INFERENCE)])
def test_workflow_properties_are_complete(workflow_type, config, tmp_path):
    load_bundle_scripts("swin_unetr_msd")
    data = generate_task(str(tmp_path / "Task09_Spleen"), "Task09_Spleen", num_train=5, num_test=1, shape=(40, 36, 20))
    workflow = ConfigWorkflow(
        config_file=str(config), meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type, num_workers=0, dataset_dir=data,
    )  # fmt: skip
    workflow.initialize()
    assert not workflow.check_properties()


def test_multi_gpu_config_runs_two_processes_on_cpu(tmp_path):
    task = "Task09_Spleen"
    data = generate_task(str(tmp_path / task), task, num_train=4, num_test=0, shape=(70, 64, 40))
    proc = run_bundle(
        [TRAIN, CONFIGS / "multi_gpu_train.json", task_file(task)], "training", torchrun=2, dataset_dir=data,
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"), max_epochs=1, val_interval=1,
        num_folds=2, **TINY,
    )  # fmt: skip
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    # 2 folds of 4 cases: 2 train (one per rank), 2 validate (one per rank); only rank 0 logs
    assert len(re.findall(r"train_loss: [0-9.]+", proc.stdout + proc.stderr)) == 1
    assert (tmp_path / "eval" / "training_curves.png").is_file()
