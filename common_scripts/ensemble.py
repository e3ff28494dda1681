"""Model ensembles (`checkpoints`, `inference_ensemble.json`): one network whose output is the mean class
probabilities of several trained models, e.g. the five cross-validation folds, as nnU-Net infers by default.

MONAI's `EnsembleEvaluator` runs every model's sliding window on its own and keeps one full-volume prediction per
model, and the bundles' post-processing (inverse resampling, argmax, NIfTI and DICOM SEG writers) would have to be
rebuilt around its per-model keys. Averaging inside one module instead keeps one
sliding window, one post-processing and every engine option (`tta`, `cpu_inference_engine`, DICOM in and out).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from ignite.handlers import Checkpoint
from torch import nn

from .mirroring import mean_log_probabilities

logger = logging.getLogger(__name__)


def load_weights(network: nn.Module, path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Loads the model weights in `path` (a bundle's `model.pt`) into `network` (strictly) and returns it.

    Raises:
        ValueError: naming `path` when it cannot be read or does not fit `network`.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        Checkpoint.load_objects(to_load={"model": network}, checkpoint=state)
    except Exception as error:
        raise ValueError(
            f"cannot load weights from {path} ({type(error).__name__}: {str(error)[:300]}); the file may be empty, "
            "truncated or saved from a network with other settings. Check `checkpoints`."
        ) from error
    return network


class ProbabilityEnsemble(nn.Module):
    """The mean of its members' softmax probabilities, returned as log-probabilities so that the bundles' softmax
    post-processing gives back exactly that mean.

    Args:
        members: networks with the same input and class logits as output (channel dim 1).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return mean_log_probabilities([member(inputs) for member in self.members])


def network_or_ensemble(
    network: nn.Module, checkpoints: Sequence[str] | None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """`network` itself when `checkpoints` is None (the bundle's handler then loads `model.pt` into it), else a
    `ProbabilityEnsemble` of copies of `network`, one loaded from each checkpoint. Every checkpoint is checked
    here, when the network is built, so a missing or mismatched one stops the run before any case is read.

    Args:
        network: the bundle's `network_def`, before any inference rewrite.
        checkpoints: the `checkpoints` setting: model files to average, or None for the single `model.pt`.
        map_location: where the weights are loaded.

    Raises:
        FileNotFoundError: naming every checkpoint that does not exist.
        ValueError: naming the checkpoint that cannot be read or does not fit the network, or an empty list.
    """
    if checkpoints is None:
        return network
    if isinstance(checkpoints, str) or not checkpoints:
        raise ValueError(f"checkpoints must be a list of model files (or null for model.pt), got {checkpoints!r}.")
    missing = [str(path) for path in checkpoints if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"checkpoints: {len(missing)} of {len(checkpoints)} missing: {', '.join(missing)}")
    members = [load_weights(copy.deepcopy(network), str(path), map_location) for path in checkpoints]
    logger.info(f"checkpoints: each window is the mean probability of {len(members)} models: {', '.join(checkpoints)}")
    return ProbabilityEnsemble(members)
