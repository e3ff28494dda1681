# Copied from common_scripts/window_attention.py by ci/sync_scripts.py: edit that file, then run the script.
"""Window attention over groups of windows, so that training on a CPU keeps its memory pool small; reused masks.

While gradients are needed, MONAI's `WindowAttention` materialises the attention weights of all windows of a block at
once (its SDPA path is for inference only, and PyTorch's fused CPU attention has no gradient for the additive bias
that carries the learned relative-position table): on a 96^3 patch the first stage has 343 windows x 3 heads x 343^2
float32 weights, hundreds of MB per tensor and several per block. Under `cpu_memory_pool` glibc seldom finds such a
block free in its heap and extends the heap instead, to more than twice the live tensors. Running MONAI's own forward
on groups of windows whose weights take at most `cpu_attention_chunk_mb` each gives the same outputs and gradients (each
window is attended on its own) and keeps the heap close to the live tensors.

MONAI's `BasicLayer` rebuilds the shifted-window attention mask (windows x tokens^2 values, and as many again in
temporaries) on every forward pass, although it depends only on the padded grid, window and shift sizes; in training
it does so on every patch, where the allocations also grow the memory pool's heap. `cache_attention_masks`
memoises MONAI's `compute_mask` (the module attribute `BasicLayer` looks up on each call), since MONAI offers no
way to pass a precomputed mask.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from monai.networks.nets import swin_unetr
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

logger = logging.getLogger(__name__)

_WEIGHT_BYTES = 4  # the softmax runs in float32, also under bfloat16 autocast


class ChunkedWindowAttention(WindowAttention):
    """MONAI's `WindowAttention`, run on groups of windows whose attention weights take at most `max_chunk_bytes`
    (one window at a time where a single window's take more)."""

    max_chunk_bytes: int = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows, tokens, channels = x.shape
        windows = rows if mask is None else mask.shape[0]  # rows are image-major: image * windows + window
        images = rows // windows
        per_window = images * self.num_heads * tokens * tokens * _WEIGHT_BYTES  # one window of every image
        step = max(1, self.max_chunk_bytes // per_window)
        if step >= windows:
            return super().forward(x, mask)
        by_window = x.view(images, windows, tokens, channels)
        outputs = []
        for start in range(0, windows, step):
            group = by_window[:, start : start + step].reshape(-1, tokens, channels)
            group_mask = None if mask is None else mask[start : start + step]
            outputs.append(super().forward(group, group_mask).view(images, -1, tokens, channels))
        return torch.cat(outputs, dim=1).view(rows, tokens, channels)


def chunk_window_attention(network: nn.Module, max_chunk_mb: float | None) -> nn.Module:
    """Returns `network`, whose window attention blocks are switched in place to compute at most `max_chunk_mb`
    megabytes of attention weights at a time (setting `cpu_attention_chunk_mb`); None leaves MONAI's blocks as they
    are."""
    if max_chunk_mb is None:
        return network
    if isinstance(max_chunk_mb, bool) or not isinstance(max_chunk_mb, (int, float)) or not 0 < max_chunk_mb < math.inf:
        raise ValueError(f"cpu_attention_chunk_mb must be a number of megabytes > 0, or null (all windows at once), "
                         f"got {max_chunk_mb!r}.")  # fmt: skip
    blocks = [m for m in network.modules() if type(m) in (WindowAttention, ChunkedWindowAttention)]
    for block in blocks:
        block.__class__ = ChunkedWindowAttention  # same parameters and state-dict keys; only `forward` differs
        block.max_chunk_bytes = int(max_chunk_mb * 2**20)
    logger.info(f"cpu_attention_chunk_mb: {len(blocks)} window attention blocks compute at most {max_chunk_mb} MB of "
                "attention weights at a time")  # fmt: skip
    return network


def cache_attention_masks(enabled: bool = True, max_masks: int = 8) -> bool:
    """Makes MONAI's Swin layers reuse their shifted-window attention masks (the last `max_masks` shapes) in this
    process when `enabled`; returns whether masks are reused. The masks are built with autograd on (they hold no
    gradient), so that a mask first built in inference mode also serves training; TorchScript tracing builds its own."""
    if enabled and not hasattr(swin_unetr.compute_mask, "cache_info"):
        build = swin_unetr.compute_mask

        @functools.lru_cache(maxsize=max_masks)
        def cached(dims: tuple, window_size: tuple, shift_size: tuple, device: torch.device) -> torch.Tensor:
            with torch.inference_mode(False):
                return build(list(dims), window_size, shift_size, device)

        @functools.wraps(build)
        def compute_mask(dims, window_size, shift_size, device):  # MONAI's signature
            if torch.jit.is_tracing():  # a cached mask would enter the trace as a constant of the first input's grid
                return build(dims, window_size, shift_size, device)
            return cached(tuple(dims), tuple(window_size), tuple(shift_size), torch.device(device))

        compute_mask.cache_info = cached.cache_info  # type: ignore[attr-defined]
        swin_unetr.compute_mask = compute_mask
        logger.info("cpu_mask_cache: Swin layers reuse their shifted-window attention masks")
    return hasattr(swin_unetr.compute_mask, "cache_info")
