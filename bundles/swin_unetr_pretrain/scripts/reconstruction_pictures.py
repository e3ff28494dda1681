"""What the inpainting head learned, as a PNG per validation: original, corrupted and reconstructed sub-volume.

MONAI's TensorBoardImageHandler shows one frame in TensorBoard; this writes
`<output_dir>/reconstruction_<n>.png` (n-th validation) with axial, coronal and sagittal slices through the centre
of the first validation sub-volume: the uncorrupted view (the target), the corrupted view the network saw
(rotated, with cutout boxes), and the network's reconstruction.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402

from .curves import save_figure  # noqa: E402


def draw_reconstruction(
    original: np.ndarray, corrupted: np.ndarray, reconstructed: np.ndarray, path: str, title: str
) -> None:
    """Writes a 3x3 PNG of three (D, H, W) volumes in RAS, sliced through their centre."""
    centre = [s // 2 for s in original.shape]
    views = {
        "axial": lambda v: np.rot90(v[:, :, centre[2]]),
        "coronal": lambda v: np.rot90(v[:, centre[1], :]),
        "sagittal": lambda v: np.rot90(v[centre[0], :, :]),
    }
    fig, axes = plt.subplots(3, 3, figsize=(9, 9), dpi=90)
    for row, (name, volume) in enumerate(
        (("original", original), ("corrupted (input)", corrupted), ("reconstructed", reconstructed))
    ):
        for col, (view, cut) in enumerate(views.items()):
            axes[row, col].imshow(cut(volume), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            axes[row, col].set_title(f"{name}, {view}", fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


class ReconstructionPictureSaver:
    """Validator handler for the SSL evaluator (output: `image` = corrupted views, `label['image']` = targets,
    `pred['reconstruction']`); draws the first item of the first batch of each validation run."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.runs = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._count)
        # the evaluator's iteration count restarts with every run, so this fires on each run's first batch
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def _count(self, _: Engine) -> None:
        self.runs += 1

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if "reconstruction" not in output["pred"]:
            return  # inpainting disabled (inpaint_weight 0)
        volumes = [
            t[0, 0].detach().float().cpu().numpy()
            for t in (output["label"]["image"], output["image"], output["pred"]["reconstruction"])
        ]
        path = os.path.join(self.output_dir, f"reconstruction_{self.runs}.png")
        draw_reconstruction(*volumes, path, f"validation {self.runs}: first sub-volume")
