"""A copy of this bundle specialised to one Decathlon task, for tools that read a bundle's files directly.

MONAI's parser merges `configs/tasks/<task>.json` over the common configs at run time, but MONAI Label and the
Model Zoo read `configs/inference.json` and `configs/metadata.json` as they are on disk. This writes a bundle
folder in which the task file is already merged into the train and inference configs and the metadata's
`network_data_format` (channels, `channel_def`, patch shape) describes that task.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

from monai.bundle import ConfigParser

MERGED_CONFIGS = ("train.json", "inference.json")  # evaluate and multi_gpu_train stay overrides of train


def task_metadata(metadata: dict, task: Mapping) -> dict:
    """`metadata` with its description of inputs and outputs replaced by the task file's."""
    meta = json.loads(json.dumps(metadata))
    modality, labels, roi = dict(task["modality"]), dict(task["labels"]), task.get("roi_size")
    is_ct = [m.upper() for m in modality.values()] == ["CT"]
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    image.update(num_channels=len(modality), channel_def=modality, modality="CT" if is_ct else "MR",
                 format="hounsfield" if is_ct else "magnitude")  # fmt: skip
    pred.update(num_channels=len(labels), channel_def=labels)
    if roi:
        image["spatial_shape"] = pred["spatial_shape"] = list(roi)
    names = ", ".join(f"{k}: {v}" for k, v in labels.items())
    meta["task"] = f"{task['task']}: segmentation of {', '.join(list(labels.values())[1:])} ({image['modality']})"
    meta["image_classes"] = f"{len(modality)} channel(s): " + ", ".join(f"{k}: {v}" for k, v in modality.items())
    meta["label_classes"] = f"single channel label map, {names}"
    meta["pred_classes"] = f"{len(labels)} channels (softmax scores), {names}"
    return meta


def write_task_bundle(bundle_root: str, task_file: str, target_dir: str, model_file: str | None = None) -> str:
    """Writes the bundle at `bundle_root` specialised to `task_file` into `target_dir` (which must not exist);
    returns `target_dir`. The folder appears complete or not at all.

    Weights in `bundle_root/models` are not copied (they may belong to another task); `model_file`, the weights
    trained for this task, becomes the copy's `models/model.pt`.
    """
    if model_file and not os.path.isfile(model_file):
        raise FileNotFoundError(f"model_file {model_file!r} does not exist.")
    if not os.path.isfile(task_file):
        raise FileNotFoundError(f"task_file {task_file!r} does not exist (see {bundle_root}/configs/tasks/).")
    if os.path.exists(target_dir):
        raise FileExistsError(f"target_dir {target_dir!r} already exists; choose a new folder.")
    task = ConfigParser.load_config_file(task_file)
    missing = [k for k in ("task", "modality", "labels") if k not in task]
    if missing:
        raise ValueError(f"task_file {task_file!r} lacks {missing}.")
    partial = os.path.join(
        os.path.dirname(os.path.abspath(target_dir)), f".partial-{os.getpid()}-{os.path.basename(target_dir)}"
    )
    shutil.copytree(
        bundle_root, partial, ignore=shutil.ignore_patterns("__pycache__", "eval", ".partial-*", "*.pt", "*.ts")
    )
    try:
        configs = os.path.join(partial, "configs")
        for name in MERGED_CONFIGS:
            merged = ConfigParser.load_config_files([os.path.join(bundle_root, "configs", name), task_file])
            with open(os.path.join(configs, name), "w") as f:
                json.dump(merged, f, indent=4)
        with open(os.path.join(bundle_root, "configs", "metadata.json")) as f:
            metadata = task_metadata(json.load(f), task)
        with open(os.path.join(configs, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=4)
        if model_file:
            shutil.copyfile(model_file, os.path.join(partial, "models", "model.pt"))
        os.rename(partial, target_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target_dir
