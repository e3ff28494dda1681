"""A picture of how training went: loss per iteration and the validation key metric, as a PNG, and the validation
history as a CSV (the key metric and each class's value, against iteration and seconds).

TensorBoard and MLflow hold the same numbers, but need a server to look at; these files open anywhere. MONAI records
(`MetricLogger`) and draws (`plot_metric_graph`) but has no handler that writes the picture during a run, and its
`MetricsSaver` keeps only the last validation; this one redraws `<output_dir>/training_curves.png` and rewrites
`<output_dir>/training_curves.csv` after each validation and when training ends.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
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


def class_means(details: Any) -> list[float]:
    """Per-class mean over cases of a metric's details (cases x classes), ignoring the NaNs of absent classes."""
    values = torch.as_tensor(details, dtype=torch.float64)
    return torch.nanmean(values.reshape(-1, values.shape[-1]), dim=0).tolist()


class TrainingCurvesPlot(MetricLogger):
    """MONAI's `MetricLogger` (the trainer's loss per iteration, the validator's metrics at the trainer's iteration)
    that draws what it logged with MONAI's `plot_metric_graph`, loss above and the validator's key metric below, and
    keeps one CSV row per validation: trainer iteration and epoch, seconds since training started in this process,
    the key metric and, where the metric saved its details, its mean over cases for each class.

    Args:
        output_dir: the folder of the PNG and the CSV.
        validator: the engine whose key metric is plotted, or None for the loss alone.
        filename: the PNG's name; the CSV has the same name ending in `.csv`.
        label_names: the network's output channels by number as text (metadata's `channel_def`), to name the CSV's
            class columns; a metric that leaves out background has one column fewer, and its columns take the names
            from label 1 on. None names them `class0`, `class1`, ... as MONAI's `MetricsSaver` does.
    """

    def __init__(
        self,
        output_dir: str,
        validator: Engine | None = None,
        filename: str = "training_curves.png",
        label_names: dict[str, str] | None = None,
    ) -> None:
        super().__init__(loss_transform=_loss_of, evaluator=validator)
        self.path = os.path.join(output_dir, filename)
        self.csv_path = os.path.splitext(self.path)[0] + ".csv"
        self.validator = validator
        self.label_names = label_names
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self.trainer = engine
        engine.add_event_handler(Events.STARTED, self._start_clock)
        engine.add_event_handler(Events.COMPLETED, self.draw)
        if self.validator is not None:  # after `attach_evaluator`'s handler, which logs the metrics
            self.validator.add_event_handler(Events.COMPLETED, self.record)
            self.validator.add_event_handler(Events.COMPLETED, self.draw)

    def _start_clock(self, _: Engine) -> None:
        self.started = time.perf_counter()

    def _class_names(self, count: int) -> list[str]:
        if not self.label_names:
            return [f"class{index}" for index in range(count)]
        first = len(self.label_names) - count
        return [self.label_names.get(str(index + first), f"class{index}") for index in range(count)]

    def record(self, _: Engine | None = None) -> None:
        """Adds the validation that just ended to the CSV and rewrites it whole."""
        name = self.validator.state.key_metric_name
        row = {
            "iteration": self.trainer.state.iteration,
            "epoch": self.trainer.state.epoch,
            "seconds": round(time.perf_counter() - self.started, 2),
            name: self.validator.state.metrics.get(name),
        }
        details = getattr(self.validator.state, "metric_details", {}).get(name)
        if details is not None:
            means = class_means(details)
            row.update(zip(self._class_names(len(means)), means))
        self.rows.append(row)
        os.makedirs(os.path.dirname(self.csv_path) or ".", exist_ok=True)
        with atomic_path(self.csv_path) as partial, open(partial, "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in self.rows for k in r)))
            writer.writeheader()
            writer.writerows(self.rows)

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
