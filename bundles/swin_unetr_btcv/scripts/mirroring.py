# Copied from common_scripts/mirroring.py by ci/sync_scripts.py: edit that file, then run the script.
"""Mirroring test-time augmentation (`tta`): the mean class probabilities of the input and its flips.

nnU-Net's default inference predicts the input and its mirror images along every combination of the spatial axes
(8 passes in 3D), flips each prediction back and averages the softmax probabilities. MONAI's
`TestTimeAugmentation` draws random transforms per pass and inverts them item by item for uncertainty estimates; it
has no deterministic set of flips and wraps no inferer, so this wraps one (any MONAI inferer, e.g. the sliding
window) and flips whole batches with `torch.flip`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.transforms import MeanEnsemble

logger = logging.getLogger(__name__)


def mirror_axes(spatial_dims: int = 3) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (batch, channel, *spatial) tensor, the unflipped input first."""
    axes = range(2, 2 + spatial_dims)
    return [flip for count in range(spatial_dims + 1) for flip in itertools.combinations(axes, count)]


def mean_log_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean softmax (over dim 1) of `logits`: a softmax of it gives back exactly the mean probabilities,
    so the bundles' post-processing (softmax, argmax) is the same with or without averaging."""
    mean = MeanEnsemble()([torch.softmax(x.float(), dim=1) for x in logits])
    return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


class MirroringInferer(Inferer):
    """Runs `inferer` on the input and its 2^d - 1 mirror images and returns the log of their mean probabilities
    (`mean_log_probabilities`); with `enabled` False it is `inferer` itself.

    Args:
        inferer: the MONAI inferer that computes each pass (its output must be class logits, channel dim 1).
        enabled: the bundle's `tta` setting.
        spatial_dims: spatial axes of the input.
    """

    def __init__(self, inferer: Inferer, enabled: bool = False, spatial_dims: int = 3) -> None:
        super().__init__()
        self.inferer = inferer
        self.enabled = bool(enabled)
        self.flips = mirror_axes(spatial_dims)
        if self.enabled:
            logger.info(f"tta: each case is predicted {len(self.flips)} times (mirrored along every axis), averaged")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        logits = []
        for flip in self.flips:
            mirrored = torch.flip(inputs, flip) if flip else inputs
            output = self.inferer(mirrored, network, *args, **kwargs)
            logits.append(torch.flip(output, flip) if flip else output)
        # the unflipped pass's output carries on, so a MetaTensor keeps its metadata for Invertd and the writers
        averaged = logits[0].clone()
        averaged.data = mean_log_probabilities(logits).to(averaged.dtype)
        return averaged
