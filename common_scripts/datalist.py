"""Training/validation lists from the BTCV folder layout or a Decathlon-style JSON, checked before training.

MONAI's `load_decathlon_datalist` reads a JSON but neither finds BTCV's `img0001`/`label0001` pairs nor checks
that files exist and labels fit the network; a bad case found this way fails in seconds with its file named,
not hours later inside a data-loader worker.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.misc import is_dicom
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

IMAGE_SUFFIXES = (".nii.gz", ".nii")


def _is_image(name: str) -> bool:
    return name.endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _case_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_name_for(image_name: str) -> list[str]:
    """BTCV pairs `img0001.nii.gz` with `label0001.nii.gz`; the Decathlon uses the same name in both folders."""
    names = [image_name]
    if image_name.startswith("img"):
        names.insert(0, "label" + image_name[len("img") :])
    return names


def _require_dir(path: str, setting: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{setting} {path!r} does not exist or is not a folder.")


def pairs_from_folder(dataset_dir: str) -> list[dict[str, str]]:
    """`{'image', 'label'}` pairs from `dataset_dir/imagesTr` and `dataset_dir/labelsTr`, sorted by case."""
    _require_dir(dataset_dir, "dataset_dir")
    image_dir, label_dir = os.path.join(dataset_dir, "imagesTr"), os.path.join(dataset_dir, "labelsTr")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir!r} has no imagesTr folder (expected imagesTr/ + labelsTr/, or set datalist)."
        )
    images = sorted(n for n in os.listdir(image_dir) if _is_image(n))
    if not images:
        raise FileNotFoundError(f"dataset_dir {dataset_dir!r}: imagesTr holds no NIfTI images (*.nii.gz, *.nii).")
    labels = set(os.listdir(label_dir)) if os.path.isdir(label_dir) else set()
    pairs, unlabelled = [], []
    for name in images:
        match = next((n for n in _label_name_for(name) if n in labels), None)
        if match is None:
            unlabelled.append(name)
            continue
        pairs.append({"image": os.path.join(image_dir, name), "label": os.path.join(label_dir, match)})
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir!r}: {len(unlabelled)} image(s) in imagesTr have no label in labelsTr: {shown}"
        )
    return pairs


def split_train_val(pairs: list[dict], val_fraction: float) -> dict[str, list[dict]]:
    """Deterministic split: the last `val_fraction` of the sorted cases (at least one) are for validation."""
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 labelled cases to train and validate, found {len(pairs)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    num_val = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction)))
    return {"training": pairs[:-num_val], "validation": pairs[-num_val:]}


def first_cases(training: list[dict], num_train_cases: int | None) -> list[dict]:
    """The first `num_train_cases` training cases (all of them when None), to fine-tune on fewer labelled scans
    with the validation cases unchanged."""
    if num_train_cases is None:
        return training
    if isinstance(num_train_cases, bool) or not isinstance(num_train_cases, int) or num_train_cases < 1:
        raise ValueError(
            f"num_train_cases must be a positive whole number or None (all cases), got {num_train_cases!r}."
        )
    if num_train_cases > len(training):
        raise ValueError(
            f"num_train_cases is {num_train_cases} but the training split holds only {len(training)} cases."
        )
    return training[:num_train_cases]


def read_volume(path: str, what: str) -> np.ndarray:
    """The voxels of a NIfTI file as float32; an error naming `path` when it cannot be read (truncated, not NIfTI).

    Args:
        path: the file.
        what: how the error names it ("image", "label").
    """
    try:
        return nib.load(path).get_fdata(dtype=np.float32)
    except Exception as error:  # nibabel, gzip and zlib each raise their own kinds
        raise ValueError(
            f"{what} {path!r} cannot be read ({type(error).__name__}: {error}); the file is truncated or not NIfTI."
        ) from error


def check_image(path: str, num_channels: int = 1) -> tuple[int, ...]:
    """Raises an error naming `path` when `image_problem` finds one; returns the image's spatial shape.

    Args:
        path: the image file.
        num_channels: the channel count the bundle's network takes.
    """
    problem = image_problem(path, num_channels)
    if problem is not None:
        raise ValueError(f"image {path!r} {problem}.")
    return tuple(nib.load(path).shape[:3])


def check_pairs(pairs: Sequence[dict], num_classes: int, num_channels: int = 1) -> None:
    """Reads every image and label whole, once, before training: both exist and can be read, the image passes
    `check_image`, the label is 3-D with the image's shape, and label values lie in 0..num_classes-1.

    Args:
        pairs: `{'image', 'label'}` file pairs.
        num_classes: classes the network predicts, background included.
        num_channels: the channel count the bundle's network takes.
    """
    for pair in pairs:
        for key in ("image", "label"):
            if not os.path.isfile(pair[key]):
                raise FileNotFoundError(f"{key} file {pair[key]!r} does not exist.")
        image_shape = check_image(pair["image"], num_channels)
        label = read_volume(pair["label"], "label")
        label = label[..., 0] if label.ndim == 4 and label.shape[3] == 1 else label
        if label.shape != image_shape:
            raise ValueError(
                f"label {pair['label']!r} has shape {label.shape} but its image {pair['image']!r} has {image_shape}."
            )
        values = np.unique(label)
        bad = values[~np.isfinite(values) | (values < 0) | (values > num_classes - 1) | (values != np.round(values))]
        if bad.size:
            shown = [int(v) if np.isfinite(v) and v == np.round(v) else float(v) for v in bad[:5]]
            raise ValueError(
                f"label {pair['label']!r} holds values {shown} outside 0..{num_classes - 1} "
                f"(num_classes={num_classes})."
            )


def build_datalist(
    dataset_dir: str,
    datalist: str | None = None,
    num_classes: int = 14,
    val_fraction: float = 0.2,
    check_data: bool = True,
    num_train_cases: int | None = None,
    num_channels: int = 1,
) -> dict[str, list[dict]]:
    """`{'training': [...], 'validation': [...]}` of `{'image', 'label'}` file pairs.

    With `datalist` (a Decathlon-style JSON with a "training" and optionally a "validation" list, relative paths
    resolved against `dataset_dir`), its lists are used; otherwise `dataset_dir` is read in the BTCV layout
    (`imagesTr/img0001.nii.gz` + `labelsTr/label0001.nii.gz`). Without a "validation" list the sorted cases are
    split by `val_fraction`. `num_train_cases` keeps only the first that many training cases (see `first_cases`).
    With `check_data` every case is read whole by `check_pairs` (`num_channels` channels per image).
    """
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist {datalist!r} does not exist.")
        with open(datalist) as f:
            keys = json.load(f).keys()
        if "training" not in keys:
            raise ValueError(f"datalist {datalist!r} has no 'training' list (keys: {sorted(keys)}).")
        training = load_decathlon_datalist(datalist, True, "training", base_dir=dataset_dir)
        if "validation" in keys:
            split = {
                "training": training,
                "validation": load_decathlon_datalist(datalist, True, "validation", dataset_dir),
            }
        else:
            split = split_train_val(training, val_fraction)
    else:
        split = split_train_val(pairs_from_folder(dataset_dir), val_fraction)
    split["training"] = first_cases(split["training"], num_train_cases)
    if check_data:
        check_pairs(split["training"] + split["validation"], num_classes, num_channels)
    return split


def is_dicom_file(path: str) -> bool:
    """Whether `path` is a DICOM file, by its content (the `DICM` marker after the 128-byte preamble) or its `.dcm`
    name: series exported from a PACS often have no file extension."""
    if not os.path.isfile(path) or _is_image(os.path.basename(path)):
        return False
    return path.lower().endswith(".dcm") or is_dicom(path)


def holds_dicom(folder: str) -> bool:
    """Whether `folder` directly holds DICOM files (it is then read as one series)."""
    return any(is_dicom_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder)))


def dicom_image_of(path: str) -> str:
    """What to read for the DICOM file `path`: the file itself when it holds a whole volume (multi-frame), else the
    series in its folder."""
    frames = getattr(dcmread(path, stop_before_pixels=True), "NumberOfFrames", 1)
    if int(frames or 1) > 1:
        return path
    folder = os.path.dirname(os.path.abspath(path))
    logging.getLogger(__name__).info(f"{path!r} is one slice of a DICOM series: segmenting the series in {folder!r}.")
    return folder


def list_images(dataset_dir: str, datalist: str | None = None) -> list[dict[str, str]]:
    """Images to segment: the datalist's "testing" list; else `dataset_dir` itself when it is a NIfTI file, a
    DICOM file (its series) or a folder of DICOM files (a series); else the NIfTI files and DICOM series folders in
    `dataset_dir/imagesTs` (or in `dataset_dir` when it has no imagesTs), with the folder itself first when it
    holds DICOM files too. DICOM files are recognised by content, so extension-less PACS exports are found.

    Args:
        dataset_dir: a folder, a NIfTI file, or a DICOM file or series folder.
        datalist: a Decathlon-style JSON whose "testing" list names the images (paths relative to `dataset_dir`).
    """
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist {datalist!r} does not exist.")
        return load_decathlon_datalist(datalist, False, "testing", base_dir=dataset_dir)
    if os.path.isfile(dataset_dir):
        if _is_image(os.path.basename(dataset_dir)):
            return [{"image": dataset_dir}]
        if is_dicom_file(dataset_dir):
            return [{"image": dicom_image_of(dataset_dir)}]
        raise ValueError(f"dataset_dir {dataset_dir!r} is a file but neither NIfTI (*.nii.gz, *.nii) nor DICOM.")
    _require_dir(dataset_dir, "dataset_dir")
    folder = os.path.join(dataset_dir, "imagesTs")
    folder = folder if os.path.isdir(folder) else dataset_dir
    found = [{"image": folder}] if holds_dicom(folder) else []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _is_image(name) or (os.path.isdir(path) and holds_dicom(path)):
            found.append({"image": path})
    if not found:
        raise FileNotFoundError(
            f"dataset_dir {folder!r} holds no NIfTI images (*.nii.gz, *.nii), DICOM files or DICOM series folders."
        )
    return found


def image_problem(path: str, num_channels: int = 1) -> str | None:
    """What keeps an image from being used (unreadable, not 3-D, another channel count, non-finite voxels), or
    None. NIfTI files and DICOM series are read whole, with the reader the bundles' transforms use.

    Args:
        path: a NIfTI file or a DICOM series folder.
        num_channels: the channel count the bundle's network takes.
    """
    try:
        image = LoadImage(image_only=True)(path)
    except Exception as error:  # each reader raises its own kinds
        return f"cannot be read ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    channels = 1 if image.ndim == 3 else image.shape[3] if image.ndim == 4 else None
    if channels is None or min(image.shape[:3]) < 2:
        kind = "a single slice" if channels else f"{image.ndim}-D"
        return f"is {kind} {tuple(image.shape)}; the bundle needs 3-D volumes"
    if channels != num_channels:
        return f"has {channels} channel(s) but the bundle expects {num_channels}"
    non_finite = int((~image.isfinite()).sum())
    return f"holds {non_finite} NaN or infinite voxels" if non_finite else None


def check_images(items: Sequence[dict], num_channels: int = 1, skip_bad_images: bool = False) -> list[dict]:
    """The items whose image passes `image_problem`, checked before inference starts. A bad image stops the run
    with its file named, or with `skip_bad_images` is logged as an error and left out.

    Args:
        items: `{'image': path}` entries, e.g. from `list_images`.
        num_channels: the channel count the bundle's network takes.
        skip_bad_images: leave bad images out instead of stopping.
    """
    good = []
    for item in items:
        problem = image_problem(item["image"], num_channels)
        if problem is None:
            good.append(item)
        elif skip_bad_images:
            logging.getLogger(__name__).error(f"skipping image {item['image']!r}: it {problem}.")
        else:
            raise ValueError(f"image {item['image']!r} {problem}; pass --skip_bad_images True to segment the rest.")
    if not good:
        raise ValueError(f"none of the {len(items)} image(s) to segment can be processed (see the errors above).")
    return good
