"""Synthetic Medical Segmentation Decathlon task folders, for tests and trying the MSD bundle.

The Decathlon cannot be redistributed, so this writes look-alike task folders exactly as distributed
(`imagesTr/ labelsTr/ imagesTs/ dataset.json`), with the modality and class names of the bundle's task file:
CT tasks get HU volumes, MRI tasks one non-negative channel per sequence (several channels stored as a 4th axis,
as in Task01/Task05), and the first organs of `synthetic_ct` relabelled 1..N as the task's classes.

    python ci/synthetic_msd.py --task Task01_BrainTumour --out_dir data/Task01_BrainTumour --num_train 5
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from synthetic_ct import AIR_HU, ORGANS, make_case, save_nifti, write_dataset_json

TASK_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "bundles", "swin_unetr_msd", "configs", "tasks"
)


def task_settings(task: str) -> dict:
    """The bundle's task file `configs/tasks/<task>.json`."""
    with open(os.path.join(TASK_DIR, f"{task}.json")) as f:
        return json.load(f)


def mri_channels(hu: np.ndarray, num_channels: int, rng: np.random.Generator) -> np.ndarray:
    """MRI-like channels from a synthetic CT: zero outside the body, a different contrast per sequence."""
    body = hu > AIR_HU + 100
    channels = []
    for c in range(num_channels):
        gain = (-1.0) ** c * (0.6 + 0.25 * c)  # alternate contrasts, as T1/T2 invert some tissues
        value = 400.0 + gain * hu.astype(np.float32) + rng.normal(0.0, 15.0, hu.shape)
        channels.append(np.where(body, np.clip(value, 1.0, None), 0.0).astype(np.float32))
    return np.stack(channels, axis=-1) if num_channels > 1 else channels[0]


def generate_task(
    out_dir: str,
    task: str,
    num_train: int = 5,
    num_test: int = 1,
    shape: Sequence[int] = (64, 60, 40),
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    modality: dict | None = None,
    labels: dict | None = None,
) -> str:
    """Writes a synthetic `task` folder (modality/labels from its task file unless given); returns `out_dir`.
    `spacing` defaults to the task's target spacing."""
    settings = task_settings(task)
    modality, labels = modality or settings["modality"], labels or settings["labels"]
    spacing = spacing or settings.get("pixdim", [1.5, 1.5, 2.0])
    is_ct = [m.upper() for m in modality.values()] == ["CT"]
    num_classes = len(labels)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    relabel = np.zeros(256, np.uint8)
    for index, organ in enumerate(ORGANS[: num_classes - 1]):
        relabel[organ.label] = index + 1
    training, test = [], []
    name = task.split("_", 1)[-1].lower()
    for n in range(num_train + num_test):
        hu, label, affine = make_case(seed * 1000 + n, shape, spacing, num_classes - 1)
        image = hu if is_ct else mri_channels(hu, len(modality), np.random.default_rng(seed * 1000 + n))
        file_name = f"{name}_{n + 1:03d}.nii.gz"
        sub = "imagesTs" if n >= num_train else "imagesTr"
        save_nifti(image, affine, os.path.join(out_dir, sub, file_name))
        if n >= num_train:
            test.append(f"./imagesTs/{file_name}")
            continue
        save_nifti(relabel[label], affine, os.path.join(out_dir, "labelsTr", file_name))
        training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
    description = f"Synthetic stand-in for the Decathlon's {task}"
    write_dataset_json(out_dir, task.split("_", 1)[-1], description, modality, labels, training, test)
    return out_dir


if __name__ == "__main__":
    import fire

    fire.Fire(generate_task)
