"""Unlabelled CT lists for pre-training from Decathlon-style JSON files or a folder glob."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from monai.data import load_decathlon_datalist


def _from_json(spec: str | dict, dataset_dir: str | None) -> tuple[list[dict], list[dict]]:
    """(training, validation) items of one datalist; `spec` is a path or {"path": ..., "base_dir": ...}."""
    path, base_dir = (spec["path"], spec.get("base_dir")) if isinstance(spec, dict) else (spec, None)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datalist {path!r} does not exist.")
    base_dir = base_dir or dataset_dir or os.path.dirname(os.path.abspath(path))
    training = load_decathlon_datalist(path, False, "training", base_dir=base_dir)
    try:
        validation = load_decathlon_datalist(path, False, "validation", base_dir=base_dir)
    except ValueError:  # no "validation" list in this file
        validation = []
    return training, validation


def build_unlabelled_datalist(
    dataset_dir: str | None = None,
    datalist: str | dict | Sequence[str | dict] | None = None,
    image_glob: str = "**/*.nii.gz",
    val_fraction: float = 0.05,
) -> dict[str, list[dict[str, str]]]:
    """`{'training': [{'image': path}, ...], 'validation': [...]}` for pre-training.

    With `datalist` (one JSON or a list; each a path or {"path", "base_dir"}; relative image paths resolve against
    base_dir, else `dataset_dir`, else the JSON's folder) their "training" and "validation" lists are joined, as the
    paper joined five public CT collections. Otherwise `image_glob` is matched under `dataset_dir`. Without any
    "validation" list, the last `val_fraction` of the sorted volumes (at least one) are held out.
    """
    training: list[dict] = []
    validation: list[dict] = []
    if datalist:
        specs = [datalist] if isinstance(datalist, (str, dict)) else list(datalist)
        for spec in specs:
            train_part, val_part = _from_json(spec, dataset_dir)
            training += train_part
            validation += val_part
    else:
        if not dataset_dir or not os.path.isdir(dataset_dir):
            raise FileNotFoundError(f"dataset_dir {dataset_dir!r} does not exist or is not a folder.")
        training = [{"image": p} for p in sorted(glob.glob(os.path.join(dataset_dir, image_glob), recursive=True))]
        if not training:
            raise FileNotFoundError(f"dataset_dir {dataset_dir!r} has no images matching image_glob {image_glob!r}.")
    if not validation:
        if len(training) < 2:
            raise ValueError(f"need at least 2 volumes to train and validate, found {len(training)}.")
        num_val = min(len(training) - 1, max(1, round(len(training) * val_fraction)))
        training, validation = training[:-num_val], training[-num_val:]
    missing = [item["image"] for item in training + validation if not os.path.exists(item["image"])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]!r}.")
    return {"training": training, "validation": validation}
