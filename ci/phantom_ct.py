"""Anatomical abdominal CT phantoms with BTCV's 13 organ labels, where intensity alone cannot segment.

`synthetic_ct.py` draws each organ as an ellipsoid of near-constant HU in a small volume: fine for plumbing tests,
but a per-voxel HU lookup nearly segments it, and after resampling a volume is about one ROI, so random crops of it
coincide. These phantoms are built to be hard in the ways real CT is:

- organs whose HU ranges overlap each other and the unlabelled tissue around them (muscle, bowel loops), with a
  contrast phase drawn per scan that shifts all enhancement together;
- spatially correlated texture inside every tissue, and white noise of a level drawn per scan;
- organ shapes and positions bent by one smooth random deformation per scan, plus per-organ size and position jitter;
- body size and subcutaneous fat thickness varying between patients;
- partial-volume edges (occupancy blended over a voxel, then a slight blur);
- a scanned stretch along the body axis drawn per scan, so organs can be cut off at the top or bottom;
- in-plane 0.8-1.0 mm and 2.0-3.0 mm slices: after resampling to 1.5 x 1.5 x 2.0 mm a volume holds many 64^3 ROIs.

`hardness` states the two figures the experiment's data must meet: the mean Dice of the best per-organ HU interval
fitted on training phantoms (a per-voxel intensity lookup; low means intensity does not segment), and how much
random crops of one volume differ. Everything is deterministic by seed.

    python ci/phantom_ct.py --out_dir data/phantoms --num_train 12 --num_test 4 --seed 0
    python ci/phantom_ct.py hardness --dataset_dir data/phantoms
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_ct import BTCV_LABELS, lps_affine, save_nifti  # noqa: E402

AIR_HU, FAT_HU, MUSCLE_HU, BOWEL_GAS_HU = -1000.0, -100.0, 55.0, -700.0


@dataclass(frozen=True)
class Organ:
    """An ellipsoid before deformation: centre x, y as fractions of the body's half-axes (RAS: +x right, +y
    anterior) and z in mm (0 near L1); radii in mm; HU in the portal-venous phase and how much of it is contrast
    enhancement (scaled per scan with the contrast phase)."""

    label: int
    centre: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float
    enhancement: float


# Painted in this order, later ones over earlier ones (vessels and adrenals over their neighbours).
ORGANS = (
    Organ(6, (0.42, 0.05, 60.0), (70.0, 65.0, 70.0), 100.0, 60.0),  # liver
    Organ(1, (-0.55, -0.25, 55.0), (25.0, 38.0, 48.0), 110.0, 70.0),  # spleen
    Organ(7, (-0.28, 0.32, 70.0), (45.0, 32.0, 45.0), 45.0, 20.0),  # stomach
    Organ(4, (0.28, 0.38, 20.0), (14.0, 14.0, 32.0), 10.0, 0.0),  # gallbladder
    Organ(2, (0.36, -0.45, 0.0), (26.0, 26.0, 48.0), 150.0, 110.0),  # right kidney
    Organ(3, (-0.36, -0.45, 10.0), (26.0, 26.0, 48.0), 150.0, 110.0),  # left kidney
    Organ(11, (-0.18, -0.10, 25.0), (55.0, 12.0, 14.0), 90.0, 50.0),  # pancreas
    Organ(5, (-0.05, -0.38, 125.0), (9.0, 9.0, 45.0), 50.0, 10.0),  # esophagus
    Organ(8, (-0.08, -0.42, 0.0), (11.0, 11.0, 400.0), 160.0, 130.0),  # aorta
    Organ(9, (0.12, -0.36, 0.0), (12.0, 9.0, 400.0), 130.0, 100.0),  # inferior vena cava
    Organ(10, (0.05, -0.02, 35.0), (45.0, 7.0, 7.0), 150.0, 120.0),  # portal and splenic veins
    Organ(12, (0.22, -0.40, 45.0), (8.0, 5.0, 15.0), 60.0, 25.0),  # right adrenal gland
    Organ(13, (-0.22, -0.38, 40.0), (8.0, 5.0, 15.0), 60.0, 25.0),  # left adrenal gland
)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std random field, correlated over shape/coarse voxels (linear upsampling of a coarse grid)."""
    field = ndimage.zoom(rng.standard_normal(coarse).astype(np.float32), np.divide(shape, coarse), order=1)
    field = field[: shape[0], : shape[1], : shape[2]]
    field = np.pad(field, [(0, s - f) for s, f in zip(shape, field.shape)], mode="edge")
    return (field - field.mean()) / (field.std() + 1e-6)


def make_phantom(seed: int, fov_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (image in HU as int16, label map as uint8, 4x4 affine) for one phantom patient.

    Args:
        seed: the patient; everything random is drawn from it.
        fov_scale: multiplies the body and organ sizes (1: adult abdomen; smaller is faster to make and to train
            on, with the same anatomy); a scan covers 17-23 cm along the body axis at any scale.
    """
    rng = np.random.default_rng(seed)
    spacing = np.array([rng.uniform(0.8, 1.0)] * 2 + [float(rng.choice([2.0, 2.5, 3.0]))])
    half_axes = np.array([rng.uniform(135.0, 170.0), rng.uniform(100.0, 130.0)]) * fov_scale
    fat_mm = rng.uniform(8.0, 35.0) * fov_scale
    z_lo = rng.uniform(-110.0, -40.0) * fov_scale
    z_hi = z_lo + rng.uniform(170.0, 230.0)  # a scan covers 17-23 cm whatever the body size
    extent = np.array([2.2 * half_axes[0], 2.3 * half_axes[1], z_hi - z_lo])
    shape = tuple(int(n) for n in np.ceil(extent / spacing))
    affine = lps_affine(spacing, shape)
    affine[2, 3] = z_lo  # slices run from z_lo up

    # World coordinates (RAS, mm) of every voxel, bent by one smooth deformation of 4-10 mm for the whole scan.
    axes = [affine[d, d] * np.arange(shape[d], dtype=np.float32) + affine[d, 3] for d in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    coarse = tuple(max(3, int(e / 60.0)) for e in extent)
    bend = rng.uniform(4.0, 10.0)
    xw, yw, zw = (axis + bend * _smooth_field(rng, shape, coarse) for axis in (x, y, z))

    # Contrast phase: 0.4 (late/plain) to 1.3 (arterial-ish) times each tissue's enhancement.
    phase = rng.uniform(0.4, 1.3)
    texture = _smooth_field(rng, shape, tuple(max(3, int(e / 6.0)) for e in extent))

    # Body: subcutaneous fat, a muscle wall, visceral fat; taper along z.
    taper = 1.0 - 0.0008 * np.abs(zw - 40.0)
    body = np.sqrt((xw / (half_axes[0] * taper)) ** 2 + (yw / (half_axes[1] * taper)) ** 2)
    wall_out = 1.0 - fat_mm / half_axes[1]
    wall_in = wall_out - rng.uniform(10.0, 16.0) / half_axes[1]
    image = np.full(shape, AIR_HU, np.float32)
    edge = float(np.mean(spacing))

    def box(centre_mm: np.ndarray, half_mm: np.ndarray) -> tuple[slice, ...]:
        """Voxel slices covering world centre +- half (plus the deformation's reach)."""
        reach = np.asarray(half_mm) + 3.0 * bend
        ends = [sorted((centre_mm[d] + s * reach[d] - affine[d, 3]) / affine[d, d] for s in (-1, 1)) for d in range(3)]
        return tuple(slice(max(0, int(lo)), min(shape[d], int(np.ceil(hi)) + 1)) for d, (lo, hi) in enumerate(ends))

    def paint(distance_mm: np.ndarray, hu: np.ndarray | float, where: tuple[slice, ...] = (slice(None),) * 3):
        """Blends `hu` into image[where] by the partial-volume occupancy of {distance <= 0}; returns that occupancy."""
        occ = np.clip(0.5 - distance_mm / edge, 0.0, 1.0)
        image[where] = image[where] * (1.0 - occ) + hu * occ
        return occ

    paint((body - 1.0) * half_axes[1], FAT_HU + 12.0 * texture)
    paint((body - wall_out) * half_axes[1], MUSCLE_HU + rng.uniform(-10, 10) + 12.0 * texture)
    cavity = (body - wall_in) * half_axes[1]
    paint(cavity, FAT_HU + rng.uniform(-20, 20) + 15.0 * texture)

    # Spine and psoas muscles behind the organs.
    spine_y = -0.72 * half_axes[1]
    paint(np.sqrt(xw**2 + (yw - spine_y) ** 2) - 20.0, 350.0 + 120.0 * texture)
    for side in (-1.0, 1.0):
        width = 14.0 + 0.06 * np.clip(40.0 - zw, 0, 200)  # the psoas widens downwards
        psoas = np.sqrt(((xw - side * 40.0) / width) ** 2 + ((yw - spine_y + 5.0) / 16.0) ** 2)
        paint((psoas - 1.0) * 14.0, MUSCLE_HU + 10.0 * texture)

    # Bowel loops: unlabelled blobs of organ-like HU, some with gas, in the lower and anterior cavity.
    for _ in range(int(rng.integers(14, 26))):
        centre = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.2, 0.6), 0.0]) * [*half_axes, 1.0]
        centre[2] = rng.uniform(-120, 30) * fov_scale
        radius = rng.uniform(10.0, 24.0) * fov_scale
        where = box(centre, np.array([radius, radius, 1.5 * radius]) + edge)
        dz = (zw[where] - centre[2]) / 1.5  # loops are longer along the body axis
        blob = np.sqrt((xw[where] - centre[0]) ** 2 + (yw[where] - centre[1]) ** 2 + dz**2)
        hu = rng.uniform(-10.0, 60.0) + phase * rng.uniform(0.0, 60.0)
        paint(blob - radius, hu + 15.0 * texture[where], where)
        if rng.uniform() < 0.35:
            paint(blob - 0.5 * radius, BOWEL_GAS_HU, where)

    label = np.zeros(shape, np.uint8)
    for organ in ORGANS:
        centre = np.array([organ.centre[0] * half_axes[0], organ.centre[1] * half_axes[1], organ.centre[2] * fov_scale])
        centre += rng.normal(0.0, [8.0, 6.0, 10.0]) * fov_scale
        radii = np.array(organ.radii_mm) * rng.uniform(0.85, 1.15, 3) * fov_scale
        tilt = rng.uniform(-0.35, 0.35)  # rotation in the axial plane
        where = box(centre, np.array([radii[:2].max()] * 2 + [radii[2]]) + edge)
        cos, sin = np.cos(tilt), np.sin(tilt)
        xb, yb = xw[where] - centre[0], yw[where] - centre[1]
        u, v = xb * cos + yb * sin, -xb * sin + yb * cos
        scaled = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + ((zw[where] - centre[2]) / radii[2]) ** 2)
        distance = np.maximum((scaled - 1.0) * radii.min(), cavity[where])  # organs stay inside the cavity
        hu = organ.hu + organ.enhancement * (phase - 1.0) + rng.uniform(-15.0, 15.0)
        occ = paint(distance, hu + rng.uniform(8.0, 18.0) * texture[where], where)
        label[where][occ >= 0.5] = organ.label

    image = ndimage.gaussian_filter(image, sigma=0.5)  # the scanner's point spread
    noise = rng.uniform(6.0, 25.0)
    image += rng.normal(0.0, noise, shape).astype(np.float32) * (image > AIR_HU + 50)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label, affine


def generate(out_dir: str, num_train: int = 12, num_test: int = 4, seed: int = 0, fov_scale: float = 1.0) -> str:
    """Writes phantoms in the BTCV layout (`imagesTr/img0001.nii.gz` + `labelsTr/label0001.nii.gz`, test cases in
    `imagesTs/` with their labels in `labelsTs/`) and `dataset.json` listing both; returns `out_dir`.

    Args:
        out_dir: folder to write into.
        num_train: labelled training cases.
        num_test: held-out cases, written with their labels so that experiments can score them.
        seed: patients are `seed * 1000 + n`.
        fov_scale: see `make_phantom`.
    """
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    listing: dict[str, list] = {"training": [], "test": []}
    for n in range(num_train + num_test):
        image, label, affine = make_phantom(seed * 1000 + n, fov_scale)
        part = "training" if n < num_train else "test"
        images, labels = ("imagesTr", "labelsTr") if part == "training" else ("imagesTs", "labelsTs")
        case = {"image": f"./{images}/img{n + 1:04d}.nii.gz", "label": f"./{labels}/label{n + 1:04d}.nii.gz"}
        save_nifti(image, affine, os.path.join(out_dir, case["image"]))
        save_nifti(label, affine, os.path.join(out_dir, case["label"]))
        listing[part].append(case)
    dataset = {"name": "PhantomBTCV", "labels": dict(enumerate(BTCV_LABELS)), "modality": {"0": "CT"}, **listing}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=2)
    return out_dir


def _hu_histograms(cases: list[dict], bins: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per organ, histograms of HU inside it and inside the body outside it, summed over `cases`."""
    inside = np.zeros((num_classes, len(bins) - 1))
    outside = np.zeros((num_classes, len(bins) - 1))
    for case in cases:
        image = np.asarray(nib.load(case["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(case["label"]).dataobj)
        body = image > FAT_HU - 150
        for organ in range(1, num_classes):
            mask = label == organ
            inside[organ] += np.histogram(image[mask], bins)[0]
            outside[organ] += np.histogram(image[body & ~mask], bins)[0]
    return inside, outside


def _interval_dice(inside: np.ndarray, outside: np.ndarray, lo: int, hi: int) -> float:
    true_pos, false_pos = inside[lo:hi].sum(), outside[lo:hi].sum()
    total = inside.sum()
    return float(2 * true_pos / (total + true_pos + false_pos)) if total else float("nan")


def hu_lookup_dice(train_cases: list[dict], test_cases: list[dict], num_classes: int = 14) -> dict[str, float]:
    """Dice on `test_cases` of the best HU interval per organ fitted on `train_cases` (each organ on its own, which
    is an upper bound on any per-voxel intensity lookup that must pick one organ per voxel).

    Returns per-organ Dice and their "mean" over the organs present in the test cases.
    """
    bins = np.arange(-300.0, 505.0, 5.0)
    train_in, train_out = _hu_histograms(train_cases, bins, num_classes)
    test_in, test_out = _hu_histograms(test_cases, bins, num_classes)
    scores: dict[str, float] = {}
    for organ in range(1, num_classes):
        candidates = [(lo, hi) for lo in range(len(bins) - 1) for hi in range(lo + 1, len(bins))]
        lo, hi = max(candidates, key=lambda c: _interval_dice(train_in[organ], train_out[organ], *c))
        scores[BTCV_LABELS[organ]] = _interval_dice(test_in[organ], test_out[organ], lo, hi)
    present = [v for v in scores.values() if not np.isnan(v)]
    scores["mean"] = float(np.mean(present))
    return scores


def crop_overlap(image: np.ndarray, roi: int, num_crops: int = 8, seed: int = 0) -> float:
    """Mean share of voxels that two random `roi`^3 crops of `image` have in common (1: every crop is the same)."""
    rng = np.random.default_rng(seed)
    starts = [rng.integers(0, max(1, n - roi + 1), num_crops) for n in image.shape]
    boxes = np.stack(starts, axis=1)
    shared = []
    for i in range(num_crops):
        for j in range(i + 1, num_crops):
            overlap = np.prod([max(0, roi - abs(int(a) - int(b))) for a, b in zip(boxes[i], boxes[j])])
            shared.append(overlap / roi**3)
    return float(np.mean(shared))


def hardness(dataset_dir: str, roi: int = 64) -> dict[str, float]:
    """The data set's two hardness figures: HU-lookup Dice (fitted on the training cases, scored on the test cases)
    and the mean crop overlap of `roi`^3 crops after resampling to 1.5 x 1.5 x 2.0 mm (in-plane foreground box)."""
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        dataset = json.load(f)
    resolve = lambda cases: [{k: os.path.join(dataset_dir, v) for k, v in c.items()} for c in cases]  # noqa: E731
    scores = hu_lookup_dice(resolve(dataset["training"]), resolve(dataset["test"]))
    overlaps, sizes = [], []
    for path in sorted(glob.glob(os.path.join(dataset_dir, "imagesTr", "*.nii.gz"))):
        img = nib.load(path)
        body = np.asarray(img.dataobj) > FAT_HU - 150
        extent = [np.ptp(np.nonzero(body.any(axis=tuple(a for a in range(3) if a != d)))[0]) + 1 for d in range(3)]
        resampled = np.round(np.array(extent) * np.abs(np.diag(img.affine)[:3]) / np.array([1.5, 1.5, 2.0])).astype(int)
        sizes.append(np.prod(resampled) / roi**3)
        overlaps.append(crop_overlap(np.zeros(resampled, np.uint8), roi))
    figures = {"hu_lookup_mean_dice": scores["mean"], "mean_crop_overlap": float(np.mean(overlaps))}
    figures["volume_in_rois"] = float(np.mean(sizes))
    figures.update({f"hu_lookup_dice/{organ}": dice for organ, dice in scores.items() if organ != "mean"})
    return figures


if __name__ == "__main__":
    import fire

    commands = {"generate": generate, "hardness": hardness}
    fire.Fire(commands if sys.argv[1:2] in (["generate"], ["hardness"]) else generate)
