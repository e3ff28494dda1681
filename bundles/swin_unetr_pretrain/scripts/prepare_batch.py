"""Turns a batch of two-view samples into the network input and the loss targets."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import PrepareBatch
from monai.utils import CommonKeys


class SSLPrepareBatch(PrepareBatch):
    """Stacks the two corrupted views along the batch, [view 1; view 2], so one forward pass serves both, and
    returns targets {"image": uncorrupted rotated views, "rotation": their rotation labels} in the same order."""

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None,
        non_blocking: bool = False, **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        def stacked(first: str, second: str) -> torch.Tensor:
            pair = torch.cat([torch.as_tensor(batchdata[first]), torch.as_tensor(batchdata[second])])
            return pair.to(device=device, non_blocking=non_blocking, **kwargs)

        inputs = stacked("view1", "view2")
        targets = {CommonKeys.IMAGE: stacked("target1", "target2"), "rotation": stacked("rot1", "rot2")}
        return inputs, targets
