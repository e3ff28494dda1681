# Copied from common_scripts/curves.py by ci/sync_scripts.py: edit that file, then run the script.
"""A picture of how training went: loss per iteration and the validation key metric, as a PNG.

TensorBoard and MLflow hold the same numbers, but need a server to look at; this file opens anywhere. MONAI records
(`MetricLogger`) and draws (`plot_metric_graph`) but has no handler that writes the picture during a run; this one
redraws `<output_dir>/training_curves.png` after each validation and when training ends.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from monai.handlers import MetricLogger  # noqa: E402
from monai.utils.jupyter_utils import plot_metric_graph  # noqa: E402

from .atomic_files import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str) -> None:
    """Saves `fig` as PNG under a temporary name, then renames it, so a reader never sees half a file; closes it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with atomic_path(path) as partial:
            fig.savefig(partial, format="png")
    finally:
        plt.close(fig)


def _loss_of(output: Any) -> float:
    item = output[0] if isinstance(output, (list, tuple)) else output
    return float(item["loss"])


class TrainingCurvesPlot(MetricLogger):
    """MONAI's `MetricLogger` (the trainer's loss per iteration, the validator's metrics at the trainer's iteration)
    that draws what it logged with MONAI's `plot_metric_graph`, loss above and the validator's key metric below.

    Args:
        output_dir: the folder of the PNG.
        validator: the engine whose key metric is plotted, or None for the loss alone.
        filename: the PNG's name.
    """

    def __init__(self, output_dir: str, validator: Engine | None = None, filename: str = "training_curves.png") -> None:
        super().__init__(loss_transform=_loss_of, evaluator=validator)
        self.path = os.path.join(output_dir, filename)
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self.draw)
        if self.validator is not None:  # after `attach_evaluator`'s handler, which logs the metrics
            self.validator.add_event_handler(Events.COMPLETED, self.draw)

    def draw(self, _: Engine | None = None) -> None:
        """Writes the PNG."""
        if not self.loss:
            return
        name = self.validator.state.key_metric_name if self.validator is not None else None
        metric = self.metrics.get(name, []) if name else []
        fig, axes = plt.subplots(2 if metric else 1, 1, figsize=(8, 4.5), dpi=100, sharex=True, squeeze=False)
        plot_metric_graph(axes[0, 0], "training loss", {"loss": self.loss}, yscale="linear", avg_keys=("loss",))
        if metric:
            plot_metric_graph(axes[1, 0], f"validation {name}", {name: metric}, yscale="linear", avg_keys=())
        axes[-1, 0].set_xlabel("iteration")
        fig.tight_layout()
        save_figure(fig, self.path)
