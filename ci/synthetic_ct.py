"""Synthetic abdominal CT with BTCV's 13 organ labels, for tests and the quickstart.

BTCV and the Decathlon cannot be redistributed, so the project makes look-alike data: NIfTI volumes with a
real (non-identity, LPS-oriented) affine, HU-like intensities (air, fat, soft tissue, bone) and up to 13
organ-shaped ellipsoids labelled as in BTCV. Everything is deterministic by seed.

    python ci/synthetic_ct.py --out_dir data/synth --num_train 6 --num_test 1              # BTCV layout
    python ci/synthetic_ct.py --out_dir data/Task99 --layout msd --num_train 6 --num_test 1 # MSD layout
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

BTCV_LABELS = (
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
    "left adrenal gland",
)  # fmt: skip

AIR_HU, FAT_HU, SOFT_TISSUE_HU, BONE_HU = -1000.0, -100.0, 35.0, 700.0


@dataclass(frozen=True)
class Organ:
    """An ellipsoid in body-relative coordinates (fractions of the body half-axes, RAS: +x right, +y anterior)."""

    label: int
    centre: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float


ORGANS = (
    Organ(6, (0.45, 0.15, 0.35), (30.0, 28.0, 32.0), 80.0),  # liver
    Organ(1, (-0.50, -0.25, 0.30), (14.0, 16.0, 18.0), 115.0),  # spleen
    Organ(2, (0.38, -0.45, -0.15), (10.0, 12.0, 18.0), 160.0),  # right kidney
    Organ(3, (-0.38, -0.45, -0.10), (10.0, 12.0, 18.0), 160.0),  # left kidney
    Organ(4, (0.30, 0.45, 0.05), (7.0, 8.0, 10.0), 5.0),  # gallbladder
    Organ(5, (0.0, -0.30, 0.80), (5.0, 5.0, 12.0), 45.0),  # esophagus
    Organ(7, (-0.28, 0.35, 0.25), (18.0, 14.0, 18.0), 15.0),  # stomach
    Organ(8, (-0.06, -0.38, 0.0), (6.0, 6.0, 60.0), 210.0),  # aorta
    Organ(9, (0.14, -0.32, 0.0), (6.0, 7.0, 60.0), 170.0),  # inferior vena cava
    Organ(10, (0.10, 0.00, 0.15), (12.0, 4.0, 4.0), 185.0),  # portal and splenic veins
    Organ(11, (-0.08, 0.05, -0.05), (20.0, 6.0, 7.0), 100.0),  # pancreas
    Organ(12, (0.26, -0.35, 0.25), (5.0, 4.0, 6.0), 55.0),  # right adrenal gland
    Organ(13, (-0.26, -0.35, 0.28), (5.0, 4.0, 6.0), 55.0),  # left adrenal gland
)


def lps_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Affine of a DICOM-like volume: axes point left, posterior, superior; world origin near the centre."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return affine


def make_case(
    seed: int,
    shape: Sequence[int] = (150, 140, 44),
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    num_organs: int = 13,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image in HU as int16, label map as uint8, 4x4 affine) for one synthetic patient."""
    rng = np.random.default_rng(seed)
    affine = lps_affine(spacing, shape)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    xyz = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    extent = np.abs(np.array(spacing) * np.array(shape))
    body_axes = np.array([0.46 * extent[0], 0.40 * extent[1]]) * rng.uniform(0.92, 1.0, 2)

    image = np.full(shape, AIR_HU, np.float32)
    body = (x / body_axes[0]) ** 2 + (y / body_axes[1]) ** 2
    image[body <= 1.0] = FAT_HU
    image[body <= 0.80] = SOFT_TISSUE_HU
    spine = (x / 9.0) ** 2 + ((y + 0.68 * body_axes[1]) / 9.0) ** 2 <= 1.0
    image[spine] = BONE_HU

    label = np.zeros(shape, np.uint8)
    half_z = extent[2] / 2
    for organ in ORGANS[:num_organs]:
        jitter = rng.uniform(-0.04, 0.04, 3)
        cx, cy = (np.array(organ.centre[:2]) + jitter[:2]) * body_axes
        cz = (organ.centre[2] + jitter[2]) * half_z
        rx, ry, rz = np.array(organ.radii_mm) * rng.uniform(0.9, 1.1, 3)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
        inside &= body <= 0.80
        label[inside] = organ.label
        image[inside] = organ.hu
    image += rng.normal(0.0, 12.0, shape).astype(np.float32) * (image > AIR_HU + 1)
    return np.round(image).astype(np.int16), label, affine


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def write_dicom_series(image: np.ndarray, affine: np.ndarray, folder: str, suffix: str = ".dcm") -> None:
    """Writes an LPS-oriented int16 HU volume as one CT DICOM file per axial slice, named `slice_<k><suffix>`
    (`suffix=""` writes extension-less files, as PACS exports often are)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom import Dataset

    os.makedirs(folder, exist_ok=True)
    spacing = np.abs(np.diag(affine)[:3])
    # NIfTI world is RAS, DICOM patient space is LPS: flip the sign of x and y.
    to_lps = np.diag([-1.0, -1.0, 1.0])
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for k in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "SYNTHETIC", k + 1
        # the patient, study and series attributes every CT image carries (a DICOM SEG copies them)
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Phantom", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.Manufacturer = "", 1, "synthetic_ct.py"
        origin = to_lps @ (affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3])
        ds.ImagePositionPatient = [float(v) for v in origin]
        # Rows run along array axis 1, columns along axis 0: row direction = axis 0 (+x in LPS).
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T).astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"slice_{k:04d}{suffix}"), enforce_file_format=True)


def write_dataset_json(
    out_dir: str, name: str, description: str, modality: dict, labels: dict, training: list[dict], test: list[str]
) -> None:
    """The Decathlon's `dataset.json` for the cases written into `out_dir`."""
    dataset = {
        "name": name,
        "description": description,
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=2)


def generate(
    out_dir: str,
    layout: str = "btcv",
    num_train: int = 6,
    num_test: int = 1,
    shape: Sequence[int] = (150, 140, 44),
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    num_organs: int = 13,
    seed: int = 0,
    task_name: str = "Task99_SyntheticBTCV",
) -> str:
    """Writes a synthetic data set in the BTCV (`imagesTr/img0001.nii.gz`, `labelsTr/label0001.nii.gz`,
    `imagesTs/`) or the MSD layout (`imagesTr/case_001.nii.gz`, ..., `dataset.json`); returns `out_dir`."""
    if layout not in ("btcv", "msd"):
        raise ValueError(f"layout must be 'btcv' or 'msd', got {layout!r}.")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    training, test = [], []
    for n in range(num_train + num_test):
        image, label, affine = make_case(seed * 1000 + n, shape, spacing, num_organs)
        is_test = n >= num_train
        if layout == "btcv":
            img_name, lbl_name = f"img{n + 1:04d}.nii.gz", f"label{n + 1:04d}.nii.gz"
        else:
            img_name = lbl_name = f"case_{n + 1:03d}.nii.gz"
        img_path = os.path.join("imagesTs" if is_test else "imagesTr", img_name)
        save_nifti(image, affine, os.path.join(out_dir, img_path))
        if is_test:
            test.append(f"./{img_path}")
            continue
        save_nifti(label, affine, os.path.join(out_dir, "labelsTr", lbl_name))
        training.append({"image": f"./{img_path}", "label": f"./labelsTr/{lbl_name}"})
    if layout == "msd":
        labels = {str(i): name for i, name in enumerate(BTCV_LABELS[: num_organs + 1])}
        write_dataset_json(
            out_dir, task_name, "Synthetic abdominal CT with BTCV organ labels", {"0": "CT"}, labels, training, test
        )
    return out_dir


if __name__ == "__main__":
    import fire

    fire.Fire(generate)
