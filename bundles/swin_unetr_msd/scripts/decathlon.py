"""Decathlon task folders: the task file checked against `dataset.json`, input channels checked, 5-fold split.

MONAI's `load_decathlon_datalist` reads the lists of a `dataset.json` but checks nothing, so a task file chosen for
the wrong folder (or a 3-channel image in a 4-channel task) would train on nonsense or fail deep in a worker.
Every check here names the file or setting at fault.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from monai.data import load_decathlon_datalist, partition_dataset

from .datalist import build_datalist, check_pairs, first_cases

DATASET_JSON = "dataset.json"


def _normalised(names: Mapping) -> dict[str, str]:
    return {str(k): str(v).strip().lower() for k, v in names.items()}


def read_dataset_json(dataset_dir: str) -> dict:
    """The task folder's `dataset.json`; a missing folder or file is a FileNotFoundError naming it."""
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir!r} does not exist or is not a folder (expected a Decathlon task folder)."
        )
    path = os.path.join(dataset_dir, DATASET_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset_dir {dataset_dir!r} has no {DATASET_JSON} (is it a Decathlon task folder?).")
    with open(path) as f:
        return json.load(f)


def check_task(dataset_dir: str, task: str, modality: Mapping, labels: Mapping) -> None:
    """Raises ValueError when the task file's `modality` or `labels` differ from the folder's `dataset.json`
    (names compared case-insensitively, as the Decathlon spells them inconsistently)."""
    dataset = read_dataset_json(dataset_dir)
    path = os.path.join(dataset_dir, DATASET_JSON)
    for setting, ours in (("modality", modality), ("labels", labels)):
        theirs = dataset.get(setting)
        if theirs is None:
            raise ValueError(f"{path} has no '{setting}' entry, so it cannot be checked against task {task!r}.")
        if _normalised(ours) != _normalised(theirs):
            raise ValueError(
                f"task {task!r} does not match {path}: its {setting} is {dict(ours)} "
                f"but the folder's is {dict(theirs)} "
                f"(choose the task file for this folder, or point dataset_dir at the {task} folder)."
            )


def fold_split(items: Sequence[dict], fold: int, num_folds: int = 5) -> dict[str, list[dict]]:
    """Deterministic k-fold split: case i (sorted by image path) validates in fold `i % num_folds`."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must lie in 0..{num_folds - 1}, got {fold}.")
    if len(items) < num_folds:
        raise ValueError(
            f"{num_folds}-fold cross-validation needs at least {num_folds} labelled cases, found {len(items)}."
        )
    ordered = sorted(items, key=lambda item: item["image"])
    # MONAI's partition_dataset deals the cases out in turn (case i to part i % num_folds); training keeps case order
    validation = set(partition_dataset(list(range(len(ordered))), num_partitions=num_folds)[fold])
    return {
        "training": [c for i, c in enumerate(ordered) if i not in validation],
        "validation": [c for i, c in enumerate(ordered) if i in validation],
    }


def build_task_datalist(
    dataset_dir: str,
    task: str,
    modality: Mapping,
    labels: Mapping,
    fold: int = 0,
    num_folds: int = 5,
    datalist: str | None = None,
    num_train_cases: int | None = None,
) -> dict[str, list[dict]]:
    """`{'training', 'validation'}` lists of `{'image', 'label'}` for one fold of a Decathlon task folder.

    The folder's `dataset.json` must agree with the task file; its "training" list is split into folds unless
    `datalist` (a JSON with its own "training"/"validation" lists, paths relative to `dataset_dir`) is given.
    Every image must have `len(modality)` channels and every label values in `0..len(labels)-1`.
    `num_train_cases` keeps only the first that many training cases of the fold; validation is unchanged.
    """
    check_task(dataset_dir, task, modality, labels)
    num_classes = len(labels)
    if datalist:
        split = build_datalist(dataset_dir, datalist, num_classes, check_data=False)
    else:
        cases = load_decathlon_datalist(os.path.join(dataset_dir, DATASET_JSON), True, "training", base_dir=dataset_dir)
        split = fold_split(cases, fold, num_folds)
    split["training"] = first_cases(split["training"], num_train_cases)
    everything = split["training"] + split["validation"]
    check_pairs(everything, num_classes, len(modality))
    return split
