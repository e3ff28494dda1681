# Copied from common_scripts/fast_norm.py by ci/sync_scripts.py: edit that file, then run the script.
"""Instance norm through PyTorch's group-norm kernel, for faster float32 inference on a CPU with the same outputs.

PyTorch computes `nn.InstanceNorm3d` on a CPU through batch norm over a reshaped input, which is slower than its
group-norm kernel on SwinUNETR's full-resolution feature maps; a group norm with one channel per group is the same
normalisation (both within 1e-6 of a float64 computation).

Channels-last maps (`cpu_channels_last`, under which oneDNN's 3^3 convolutions are faster on full-resolution maps)
are normalised here instead: PyTorch's group-norm and batch-norm kernels on channels-last maps were 1e-3 to 5e-3 off
a float64 computation (one-pass sums of squares), and MONAI's instance norm copies them to channels-first. The
statistics are taken per depth slice, centred within the slice while it is in cache, and combined exactly (Chan et
al.'s pairwise update), then one pass writes the output: ~1e-6 off float64.

The swap gained nothing measurable in training, so only inference and evaluation use it, and the channels-last path
runs without gradients only. Parameter names and values are unchanged, so checkpoints load either way. Measurements:
`docs/performance.md` in the repository.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class FastInstanceNorm3d(nn.InstanceNorm3d):
    """`nn.InstanceNorm3d` without running statistics, computed by the group-norm kernel with one channel a group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5 and x.is_contiguous():
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not torch.is_grad_enabled():
            return channels_last_instance_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)  # unbatched input: group_norm would read the channels as the batch


def channels_last_instance_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Instance norm of a channels-last (N, C, D, H, W) map, returned channels-last in its dtype; statistics per depth
    slice, in float32 also for bfloat16 maps (opt-in bfloat16 inference), as PyTorch's own norm kernels keep them."""
    images, channels, depth = x.shape[:3]
    per_slice = x.shape[3] * x.shape[4]
    voxels = x.permute(0, 2, 3, 4, 1)  # channels-last memory read as (N, D, H, W, C): contiguous
    slices = voxels.reshape(images, depth, per_slice, channels)
    slice_means = slices.sum(2, dtype=torch.float32) / per_slice
    slice_squares = slice_means.new_empty(images, depth, channels)  # squared deviations from each slice's own mean
    centred = slice_means.new_empty(per_slice, channels)
    for image in range(images):
        for d in range(depth):
            torch.sub(slices[image, d], slice_means[image, d], out=centred)
            torch.sum(centred.square_(), 0, out=slice_squares[image, d])
    means = slice_means.mean(1)
    spread = per_slice * (slice_means - means[:, None]).square().sum(1)
    scale = torch.rsqrt((slice_squares.sum(1) + spread) / (depth * per_slice) + eps)
    scale = scale if weight is None else scale * weight
    shift = -means * scale if bias is None else bias - means * scale
    out = torch.addcmul(shift[:, None, None, None], voxels, scale[:, None, None, None])
    return out.to(x.dtype).permute(0, 4, 1, 2, 3)


def use_fast_norm(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Returns `network`, whose instance norms (without running statistics) are swapped in place when `enabled`."""
    if not enabled:
        return network
    swapped = 0
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.InstanceNorm3d and not child.track_running_stats:
                norm = FastInstanceNorm3d(child.num_features, eps=child.eps, affine=child.affine)
                norm.load_state_dict(child.state_dict())
                setattr(parent, name, norm.to(child.weight.device) if child.affine else norm)
                swapped += 1
    logger.info(f"cpu_fast_norm: {swapped} instance norms run through the group-norm kernel.")
    return network
