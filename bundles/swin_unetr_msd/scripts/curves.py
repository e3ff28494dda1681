# Copied from common_scripts/curves.py by ci/sync_scripts.py: edit that file, then run the script.
"""A picture of how training went: loss per iteration and the validation key metric, as a PNG.

TensorBoard and MLflow hold the same numbers, but need a server to look at; this file opens anywhere. MONAI has
no handler that plots, so this one records the trainer's loss and the validator's key metric and redraws
`<output_dir>/training_curves.png` after each validation and when training ends.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402

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


class TrainingCurvesPlot:
    """Trainer handler; `validator` is the engine whose key metric is plotted against the trainer's iteration."""

    def __init__(self, output_dir: str, validator: Engine | None = None, filename: str = "training_curves.png") -> None:
        self.path = os.path.join(output_dir, filename)
        self.validator = validator
        self.losses: list[tuple[int, float]] = []
        self.metrics: list[tuple[int, float]] = []
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_loss)
        engine.add_event_handler(Events.COMPLETED, self.draw)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._record_metric)

    def _record_loss(self, engine: Engine) -> None:
        self.losses.append((engine.state.iteration, _loss_of(engine.state.output)))

    def _record_metric(self, validator: Engine) -> None:
        name = validator.state.key_metric_name
        if name is not None and self.trainer is not None:
            self.metrics.append((self.trainer.state.iteration, float(validator.state.metrics[name])))
            self.draw()

    def draw(self, _: Engine | None = None) -> None:
        """Writes the PNG."""
        if not self.losses:
            return
        fig, ax_loss = plt.subplots(figsize=(8, 4.5), dpi=100)
        steps, losses = zip(*self.losses)
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="training loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax_loss.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"training loss (mean of {window})")
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss", color="tab:blue")
        handles, labels = ax_loss.get_legend_handles_labels()
        if self.metrics and self.validator is not None:
            ax_metric = ax_loss.twinx()
            at, values = zip(*self.metrics)
            name = self.validator.state.key_metric_name
            ax_metric.plot(at, values, "o-", color="tab:orange", label=f"validation {name}")
            ax_metric.set_ylabel(name, color="tab:orange")
            more_handles, more_labels = ax_metric.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax_loss.legend(handles, labels, loc="upper right", fontsize=8)
        ax_loss.set_title("training curves")
        fig.tight_layout()
        save_figure(fig, self.path)
