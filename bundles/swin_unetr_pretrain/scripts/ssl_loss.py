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

    With `queue_size` 0 (the paper's loss) the contrastive term is MONAI's `ContrastiveLoss`: each view's
    negatives are the other 2B - 2 views of its batch. With `queue_size` K > 0 (setting `contrast_queue_size`)
    the last K projections of earlier training steps are extra negatives, as in MoCo's queue: the term is
    `QueuedContrastiveLoss`, and its queue is this module's state, saved in checkpoints for an exact resume.
    `contrastive` stays MONAI's in-batch loss either way, so validation scores the same task for every K.

    Args:
        inpaint_weight: weight of the L1 reconstruction term (0: off).
        contrast_weight: weight of the contrastive term (0: off).
        rot_weight: weight of the rotation cross-entropy (0: off).
        temperature: NT-Xent temperature.
        queue_size: earlier projections kept as extra contrastive negatives (0: none, the paper's loss).
        projection_dim: length of the contrastive projections (the queue's width).
    """

    def __init__(
        self,
        inpaint_weight: float = 1.0,
        contrast_weight: float = 1.0,
        rot_weight: float = 1.0,
        temperature: float = 0.5,
        queue_size: int = 0,
        projection_dim: int = 512,
    ) -> None:
        super().__init__()
        self.weights = {"inpaint": inpaint_weight, "contrast": contrast_weight, "rotation": rot_weight}
        if all(w == 0 for w in self.weights.values()):
            raise ValueError("at least one of inpaint_weight, contrast_weight, rot_weight must be non-zero.")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"contrast_queue_size must be a whole number >= 0, got {queue_size!r}.")
        self.contrastive = ContrastiveLoss(temperature=temperature)
        self.queued = QueuedContrastiveLoss(temperature, queue_size, projection_dim) if queue_size else None
        self.terms: dict[str, float] = {}

    def forward(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.weights["inpaint"]:
            terms["inpaint"] = nn.functional.l1_loss(predictions["reconstruction"].float(), targets["image"].float())
        if self.weights["contrast"]:
            view1, view2 = predictions["contrastive"].float().chunk(2)
            contrastive = self.queued if self.queued is not None else self.contrastive
            terms["contrast"] = contrastive(view1, view2)
        if self.weights["rotation"]:
            terms["rotation"] = nn.functional.cross_entropy(predictions["rotation"].float(), targets["rotation"])
        self.terms = {name: value.item() for name, value in terms.items()}
        return sum(self.weights[name] * value for name, value in terms.items())  # type: ignore[return-value]


class QueuedContrastiveLoss(nn.Module):
    """NT-Xent between two views with the projections of earlier steps as extra negatives (MoCo's queue).

    Written here because MONAI's `ContrastiveLoss` takes the batch's own views as the only negatives. Each view's
    candidates are the other 2B - 1 views of its batch (its positive among them) and the queue's filled entries;
    with an empty queue the loss equals `ContrastiveLoss`. After each call made with gradients on (a training
    step), the batch's 2B normalised projections, detached, replace the oldest entries. The queued projections
    come from the same network at earlier steps (no momentum encoder, which would need a second encoder in the
    engine), so a queue much longer than a few steps holds stale projections. Under DDP each process keeps its own.

    Args:
        temperature: NT-Xent temperature.
        queue_size: number of earlier projections kept (K > 0).
        projection_dim: length of the projections.
    """

    def __init__(self, temperature: float, queue_size: int, projection_dim: int) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"contrast_queue_size must be >= 1 for a queue, got {queue_size}.")
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_size, projection_dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # entries holding a projection
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # where the next projection goes

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        if view1.shape != view2.shape or view1.ndim != 2:
            raise ValueError(
                f"both views need (B, dim) projections, got {tuple(view1.shape)} and {tuple(view2.shape)}."
            )
        if view1.shape[1] != self.queue.shape[1]:
            raise ValueError(
                f"projections have {view1.shape[1]} values, the queue {self.queue.shape[1]} (projection_dim)."
            )
        if self.queue.device != view1.device:
            self.to(view1.device)
        # plain tensors: the queue keeps values only, and slicing a batch of MetaTensors checks their metadata
        views = nn.functional.normalize(torch.cat([view1, view2]).as_subclass(torch.Tensor), dim=1)
        count = len(view1)
        similarity = views @ views.T / self.temperature
        similarity = similarity.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=views.device), -math.inf)
        queued = self.queue[: int(self.filled)].clone()  # backward needs these values after the queue moves on
        logits = torch.cat([similarity, views @ queued.T / self.temperature], dim=1)
        positives = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(views.device)
        loss = nn.functional.cross_entropy(logits, positives)
        if torch.is_grad_enabled():
            self._enqueue(views.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, projections: torch.Tensor) -> None:
        """Writes `projections` over the oldest entries, wrapping around the end of the queue."""
        size = len(self.queue)
        projections = projections[-size:]
        slots = (int(self.position) + torch.arange(len(projections))) % size
        self.queue[slots.to(self.queue.device)] = projections.to(self.queue.dtype)
        self.position.fill_((int(self.position) + len(projections)) % size)
        self.filled.fill_(min(size, int(self.filled) + len(projections)))


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
