"""The paper's combined self-supervised loss: lambda_1 inpainting + lambda_2 contrastive + lambda_3 rotation."""

from __future__ import annotations

import math

import torch
from monai.losses import ContrastiveLoss
from torch import nn


class SSLLoss(nn.Module):
    """Weighted sum of L1 reconstruction, NT-Xent between the two views and rotation cross-entropy.

    `predictions` come from `SSLHead` run on both views stacked along the batch ([view 1; view 2]); `targets`
    hold "image" (the uncorrupted rotated views, same stacking) and "rotation" (labels 0-3). A task whose
    weight is 0 is skipped, and its head may then be absent. The last unweighted terms are kept in `terms`
    for logging.
    """

    def __init__(
        self,
        inpaint_weight: float = 1.0,
        contrast_weight: float = 1.0,
        rot_weight: float = 1.0,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        self.weights = {"inpaint": inpaint_weight, "contrast": contrast_weight, "rotation": rot_weight}
        if all(w == 0 for w in self.weights.values()):
            raise ValueError("at least one of inpaint_weight, contrast_weight, rot_weight must be non-zero.")
        self.contrastive = ContrastiveLoss(temperature=temperature)
        self.terms: dict[str, float] = {}

    def forward(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.weights["inpaint"]:
            terms["inpaint"] = nn.functional.l1_loss(predictions["reconstruction"].float(), targets["image"].float())
        if self.weights["contrast"]:
            view1, view2 = predictions["contrastive"].float().chunk(2)
            terms["contrast"] = self.contrastive(view1, view2)
        if self.weights["rotation"]:
            terms["rotation"] = nn.functional.cross_entropy(predictions["rotation"].float(), targets["rotation"])
        self.terms = {name: value.item() for name, value in terms.items()}
        return sum(self.weights[name] * value for name, value in terms.items())  # type: ignore[return-value]


def contrastive_chance(view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
    """The NT-Xent loss of projections that carry no information, ln(2B - 1) for B sub-volumes: with every
    similarity equal, each view's positive is one of its 2B - 1 candidates. The chance line of the contrastive term.

    Args:
        view1: projections of the first views, B rows.
        view2: projections of the second views, B rows (only their number matters).
    """
    if len(view1) != len(view2):
        raise ValueError(f"both views need one projection per sub-volume, got {len(view1)} and {len(view2)}.")
    return torch.tensor(math.log(2 * len(view1) - 1))
