"""Training on a batch of patches a few at a time, for the same result with less memory per pass.

A fine-tuning step takes `batch_size * num_samples` patches (4 by default). Through SwinUNETR in one pass, the
activations of all of them are alive at once: a 4-patch bfloat16 step at feature 48 and 96^3 peaked at ~9 GB on a
2-core CPU, and most of its time went to the kernel handing out fresh memory. `PatchwiseInferer` runs the network on
`patches_per_pass` patches at a time, each group under gradient checkpointing: the forward pass keeps only each
group's input and output, and the backward pass recomputes one group's activations at a time. The network
normalises every patch on its own (instance and layer norms), so outputs, loss and gradients are those of the
whole batch (`tests/test_btcv_scripts.py`); the price is one more forward pass per step. With memory kept for
reuse (`cpu_memory_pool`) the same 4-patch step took less time at less memory (README, Performance). MONAI's engines have no such
option (their `iteration_update` would mean restating the training iteration), so it is an inferer. This file is a
bundle-local copy (identical in the fine-tuning bundles) so each bundle works when copied alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import Inferer
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


class PatchwiseInferer(Inferer):
    """Runs `inferer` on `patches_per_pass` patches of the batch at a time while gradients are recorded.

    Args:
        inferer: the MONAI inferer doing the work (e.g. `SimpleInferer`, or `AutocastInferer` around it).
        patches_per_pass: patches per forward pass when training; 0 runs the whole batch in one pass, as does
            evaluation (no gradients: nothing to keep for a backward pass).
    """

    def __init__(self, inferer: Inferer, patches_per_pass: int = 0) -> None:
        if isinstance(patches_per_pass, bool) or not isinstance(patches_per_pass, int) or patches_per_pass < 0:
            raise ValueError(f"patches_per_pass must be a whole number, 0 (whole batch) or more, got {patches_per_pass!r}.")
        self.inferer = inferer
        self.patches_per_pass = patches_per_pass
        if patches_per_pass:
            logger.info(f"patches_per_pass: training runs the network on {patches_per_pass} patch"
                        f"{'es' if patches_per_pass > 1 else ''} at a time, each under gradient checkpointing")

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        size = self.patches_per_pass
        if size == 0 or inputs.shape[0] <= size or not torch.is_grad_enabled():
            return self.inferer(inputs, network, *args, **kwargs)

        def run(group: torch.Tensor) -> torch.Tensor:
            return self.inferer(group, network, *args, **kwargs)

        return torch.cat([checkpoint(run, group, use_reentrant=False) for group in inputs.split(size)])
