# Copied from common_scripts/patchwise.py by ci/sync_scripts.py: edit that file, then run the script.
"""Training on a batch of patches a few at a time, for the same step with less memory per pass.

A fine-tuning step takes `batch_size * num_samples` patches (4 by default). Through SwinUNETR in one pass, the
activations of all of them are alive at once, and on a CPU most of the step's time goes to the kernel handing out
fresh memory. `PatchwiseIteration` runs MONAI's own
training iteration (`SupervisedTrainer._iteration`: forward, loss, backward) on `patches_per_pass` patches at a
time, so only one group's activations are alive at once, and lets the optimizer step once, on the gradients summed
over the groups with the loss of each group weighted by its share of the batch. The network normalises every patch
on its own (instance and layer norms) and DiceCE averages over patches, so loss and gradients are those of one pass
over the batch (`tests/test_btcv_scripts.py`). MONAI's `accumulation_steps` accumulates over iterations, i.e. over
batches of the data loader, not over parts of one batch, hence this `iteration_update`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from monai.utils import CommonKeys

from .checks import check_patches_per_pass

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Callable | None) -> Iterator[None]:
    """Makes `owner.name` be `value` for the block (`None`: leave it alone), then puts back what was there."""
    if value is None:
        yield
        return
    had_own = name in vars(owner)  # e.g. the optimizer's `step` as wrapped by an LR scheduler
    saved = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, saved)
        else:
            delattr(owner, name)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _part(value: Any, start: int, stop: int, batch_size: int) -> Any:
    """The items `start:stop` of a batched tensor or list; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[start:stop]
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return value[start:stop]
    return value


def _joined(parts: list) -> Any:
    """The parts' batches or outputs as one: lists (decollated) and batched tensors concatenated, dicts per key."""
    if all(isinstance(part, list) for part in parts):
        return [item for part in parts for item in part]
    if all(isinstance(part, dict) for part in parts):
        return {key: _joined([part[key] for part in parts]) for key in parts[0]}
    if all(isinstance(part, torch.Tensor) and part.ndim > 0 for part in parts):
        return torch.cat([part.detach() for part in parts])
    return parts[0]


def _loss(output: Any) -> Any:
    return (output[0] if isinstance(output, list) else output)[CommonKeys.LOSS]


class PatchwiseIteration:
    """`iteration_update` for `SupervisedTrainer`: one optimizer step per batch, `patches_per_pass` patches per pass.

    The engine's state ends as after one pass over the batch: the batch and the output (decollated or not, as the
    engine does) of all patches, the loss that of the whole batch. Exact for losses that average over patches, as
    the bundle's DiceCE does; a loss that pools the batch first (e.g. `DiceLoss(batch=True)`) sees each part alone.

    Args:
        patches_per_pass: patches per forward/backward pass (setting `cpu_patches_per_pass`); None runs the whole
            batch in one pass (MONAI's iteration unchanged), as does any batch of at most that many patches.
    """

    def __init__(self, patches_per_pass: int | None = None) -> None:
        self.patches_per_pass = check_patches_per_pass(patches_per_pass)
        if patches_per_pass is not None:
            logger.info(
                f"cpu_patches_per_pass: training runs the network on {patches_per_pass} patch"
                f"{'es' if patches_per_pass > 1 else ''} at a time, one optimizer step per batch"
            )

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> Any:
        size = self.patches_per_pass
        images = batchdata.get(CommonKeys.IMAGE) if isinstance(batchdata, dict) else None
        if size is None or not isinstance(images, torch.Tensor) or images.shape[0] <= size:
            return engine._iteration(engine, batchdata)
        batch_size = images.shape[0]
        loss_function, optimizer, scaler = engine.loss_function, engine.optimizer, getattr(engine, "scaler", None)
        batches, outputs = [], []
        try:
            for start in range(0, batch_size, size):
                stop = min(start + size, batch_size)
                first, last = start == 0, stop == batch_size
                part = {key: _part(value, start, stop, batch_size) for key, value in batchdata.items()}
                # DiceCE averages over patches: the parts' losses, weighted by their share, add up to the batch's
                engine.loss_function = lambda pred, target, share=(stop - start) / batch_size: (
                    loss_function(pred, target) * share
                )
                engine.state.batch = part  # what MONAI's decollation (on by default) reads at MODEL_COMPLETED
                with contextlib.ExitStack() as stack:
                    stack.enter_context(_replaced(optimizer, "zero_grad", None if first else _nothing))
                    stack.enter_context(_replaced(optimizer, "step", None if last else _nothing))
                    if scaler is not None:  # CUDA AMP: unscale and step once, after the last part
                        stack.enter_context(_replaced(scaler, "step", None if last else _nothing))
                        stack.enter_context(_replaced(scaler, "update", None if last else _nothing))
                    if hasattr(engine.network, "no_sync") and not last:
                        # DDP averages gradients over processes at each backward pass; after the last part suffices
                        stack.enter_context(engine.network.no_sync())
                    outputs.append(engine._iteration(engine, part))
                batches.append(engine.state.batch)
        finally:
            engine.loss_function = loss_function
        total = sum(loss.detach() if isinstance(loss, torch.Tensor) else loss for loss in map(_loss, outputs))
        output = _joined(outputs)
        for item in output if isinstance(output, list) else [output]:
            item[CommonKeys.LOSS] = total
        engine.state.batch, engine.state.output = _joined(batches), output
        return output
