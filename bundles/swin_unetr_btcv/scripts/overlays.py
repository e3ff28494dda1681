# Copied from common_scripts/overlays.py by ci/sync_scripts.py: edit that file, then run the script.
"""Per-case pictures of an evaluation: prediction and ground truth over the image, through the largest structure.

Dice tables say how much is wrong, a picture says where. MONAI's image handlers write to TensorBoard only and show
one slice of the resampled volume; this writes `<output_dir>/<case>.png` with axial, coronal and sagittal slices
through the centre of the largest labelled structure, in the image's original space turned to RAS for display,
ground truth in the top row and prediction in the bottom row, both as coloured overlays, with a legend of the
structures shown and the patient's directions at the edges of each view.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402

from .curves import save_figure  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# tab20 holds ten hues, each dark then light: the dark ones first, so that consecutive labels (left and right
# kidney, the two adrenal glands) differ in hue, not only in lightness
_PALETTE = plt.get_cmap("tab20")(np.r_[0:20:2, 1:20:2])
# the patient directions at the (left, right, top, bottom) edges of each view as `draw_case` turns the RAS slices:
# the radiological convention of PACS viewers, the patient's right on the viewer's left in axial and coronal views
VIEW_EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("P", "A", "S", "I")}
_EDGE_PLACES = ((0.0, 0.5, "left", "center"), (1.0, 0.5, "right", "center"), (0.5, 1.0, "center", "top"),
                (0.5, 0.0, "center", "bottom"))  # fmt: skip


def label_colours(num_classes: int) -> np.ndarray:
    """RGBA colour of each label 0..num_classes-1 (0, the background, is never drawn)."""
    return np.array([_PALETTE[(label - 1) % len(_PALETTE)] for label in range(num_classes)])


def legend_entries(truth: np.ndarray, pred: np.ndarray, names: Mapping[int, str]) -> list[tuple[int, str]]:
    """(label, name) of every structure in the ground truth or the prediction, background left out."""
    present = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
    return [(int(label), names.get(int(label), f"label {label}")) for label in present]


def _as_label_map(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, ...) one-hot or (1, ...) labels -> integer label map (...)."""
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return data.argmax(0) if data.shape[0] > 1 else data[0].astype(np.int64)


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorders/flips the three spatial axes so that they run R, A, S (display only, no resampling)."""
    return nib.orientations.apply_orientation(volume, _ras_transform(affine))


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along the R, A, S axes of `_to_ras`'s output."""
    spacing, ras = np.empty(3), _ras_transform(affine)
    spacing[ras[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)[:3]
    return spacing


def _centre_of_largest(label: np.ndarray) -> tuple[int, ...]:
    values, counts = np.unique(label[label > 0], return_counts=True)
    if not values.size:
        return tuple(s // 2 for s in label.shape)
    return tuple(int(round(c)) for c in np.argwhere(label == values[counts.argmax()]).mean(0))


def view_slices(volume: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices through `centre` of a RAS volume, turned for display as `VIEW_EDGES`
    names their edges (anterior or superior up; axial and coronal seen from the feet and the front, so the patient's
    right is on the viewer's left)."""
    return {
        "axial": np.rot90(volume[:, :, centre[2]])[:, ::-1],
        "coronal": np.rot90(volume[:, centre[1], :])[:, ::-1],
        "sagittal": np.rot90(volume[centre[0], :, :]),
    }


def draw_case(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    spacing: np.ndarray,
    title: str,
    path: str,
    num_classes: int,
    names: Mapping[int, str] | None = None,
) -> None:
    """Writes a 2x3 PNG: ground truth / prediction over axial, coronal and sagittal slices (RAS volumes, their
    voxel `spacing` in mm, so that anisotropic voxels are shown with their true proportions), the patient's
    directions at the edges (`VIEW_EDGES`) and a legend of the structures shown, named by `names`."""
    centre = _centre_of_largest(truth)
    colours = label_colours(max(num_classes, 2))
    cmap = ListedColormap(colours)
    low, high = np.percentile(image, [1, 99])
    aspects = {
        "axial": spacing[1] / spacing[0],
        "coronal": spacing[2] / spacing[0],
        "sagittal": spacing[2] / spacing[1],
    }
    image_views = view_slices(image, centre)
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.5), dpi=90)
    for row, (name, labels) in enumerate((("ground truth", truth), ("prediction", pred))):
        label_views = view_slices(labels, centre)
        for col, (view, aspect) in enumerate(aspects.items()):
            ax = axes[row, col]
            ax.imshow(image_views[view], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect)
            overlay = np.ma.masked_equal(label_views[view], 0)  # background stays see-through
            ax.imshow(
                overlay, cmap=cmap, vmin=0, vmax=len(colours) - 1, alpha=0.5, interpolation="nearest", aspect=aspect
            )
            ax.set_title(f"{name}, {view}", fontsize=9)
            ax.axis("off")
            for text, (x, y, ha, va) in zip(VIEW_EDGES[view], _EDGE_PLACES):
                ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8, weight="bold")
    entries = legend_entries(truth, pred, names or {})
    if entries:
        handles = [Patch(color=colours[label], label=f"{label} {name}") for label, name in entries]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if entries else 0, 1, 1))
    save_figure(fig, path)


class SegmentationOverlaySaver:
    """Evaluator handler: one PNG per case from the decollated batch and output's `image_key`, `label_key` and
    `pred_key` (all in the same space; one-hot or label maps).

    Args:
        output_dir: the folder of the PNGs.
        num_classes: the labels, background included.
        label_names: the name of each label (e.g. the metadata's `channel_def`; keys may be strings).
        image_key, label_key, pred_key: where the image, ground truth and prediction are.
    """

    def __init__(
        self,
        output_dir: str,
        num_classes: int,
        label_names: Mapping[int | str, str] | Sequence[str] | None = None,
        image_key: str = "original_image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir, self.num_classes = output_dir, num_classes
        if isinstance(label_names, Sequence) and not isinstance(label_names, str):
            label_names = dict(enumerate(label_names))
        self.names = {int(label): str(name) for label, name in (label_names or {}).items()}
        self.image_key, self.label_key, self.pred_key = image_key, label_key, pred_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        # postprocessing leaves keys it did not create (such as the original image) in the batch, not the output
        for batch_item, output_item in zip(engine.state.batch, engine.state.output):
            item = {**batch_item, **output_item}
            image = item[self.image_key]
            affine = np.asarray(image.affine) if hasattr(image, "affine") else np.eye(4)
            name = (
                os.path.basename(str(image.meta.get("filename_or_obj", "case"))) if hasattr(image, "meta") else "case"
            )
            name = name.split(".nii")[0]
            volume = _to_ras(np.asarray(image.detach().cpu())[0], affine)
            truth = _to_ras(_as_label_map(item[self.label_key]), affine)
            pred = _to_ras(_as_label_map(item[self.pred_key]), affine)
            title = f"{name}: ground truth (top) and prediction (bottom), largest structure's centre"
            path = os.path.join(self.output_dir, f"{name}.png")
            draw_case(volume, truth, pred, _ras_spacing(affine), title, path, self.num_classes, self.names)
