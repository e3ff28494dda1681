"""Gradient-norm clipping for MONAI's SupervisedTrainer, which has no clipping option of its own.

The trainer fires BACKWARD_COMPLETED between `backward()` and `optimizer.step()`; clipping there (after unscaling
the gradients when AMP's GradScaler is in use) is the documented place for it.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents


class GradientClipHandler:
    """Clips the global gradient norm of the trainer's network to `max_norm` before each optimizer step."""

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"grad_clip_norm must be a positive number, or null (no clipping), got {max_norm!r}.")
        self.max_norm = max_norm

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
