# Copied from common_scripts/finite_loss.py by ci/sync_scripts.py: edit that file, then run the script.
"""Stopping training at the first loss that is NaN or infinite.

Ignite's `TerminateOnNan` ends such a run as if it had finished (exit status 0), and MONAI's engines carry on
through NaN otherwise, writing NaN weights into every later checkpoint. `FiniteLossCheck` raises instead, before the
epoch's checkpoint is written, so the run fails with a one-line reason and the last checkpoint still holds finite
weights to resume from.
"""

from __future__ import annotations

import math

from ignite.engine import Engine, Events


class FiniteLossCheck:
    """Raises `FloatingPointError` at the first training iteration whose loss is not finite.

    Args:
        ckpt_dir: where the run's checkpoints are, named in the error so the user knows what to resume from.
    """

    def __init__(self, ckpt_dir: str = "") -> None:
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = float((output[0] if isinstance(output, list) else output)["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: stopped "
                f"before writing more checkpoints; resume from the last one in {self.ckpt_dir} with `--resume True`, "
                "e.g. with a lower learning_rate or `--amp False`."
            )
