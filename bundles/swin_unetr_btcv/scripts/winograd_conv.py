# Copied from common_scripts/winograd_conv.py by ci/sync_scripts.py: edit that file, then run the script.
"""3^3 convolutions with half the multiplications along one axis (Winograd's F(4,3)), for faster float32 inference
on a CPU with the same outputs within float32 rounding.

oneDNN runs SwinUNETR's 3^3 convolutions at about the float32 peak of a CPU, so only less arithmetic makes them
faster. Winograd's minimal filtering (Lavin and Gray, CVPR 2016) computes 4 outputs of a
3-tap filter from 6 products instead of 12. Along the last axis:
- the input becomes 6 maps of a quarter of its width, each a sum of every 4th column with small integer weights;
- each is convolved by oneDNN with a 3 x 3 x 1 kernel, the 3^3 kernel's taps along that axis combined likewise;
- the 6 results combine into the 4 columns of each output tile.
Neither PyTorch nor oneDNN computes 3-D convolutions this way (oneDNN's Winograd convolutions are 2-D 3 x 3 only), so
the transforms are written here with PyTorch's elementwise operations around oneDNN's 3 x 3 x 1 convolutions.
Outputs are within ~3e-5 of a float64 computation for values up to ~6 (oneDNN's own: ~1e-5); measurements:
`docs/performance.md` in the repository.

Only float32 channels-last maps without gradients take this path (inference and evaluation), with a last axis of a
multiple of 4, at least `MIN_VOXELS` voxels and `MIN_CHANNELS` input channels: smaller or narrower maps were no faster
or slower. Parameter names and values are unchanged, so checkpoints load either way.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MIN_VOXELS = 24**3  # measured faster down to 24^3 maps (48 -> 48 at 96^3 and 48^3, 96 -> 96 at 24^3), slower at 12^3
MIN_CHANNELS = 48  # measured: 48 -> 24 and wider faster; 32 -> 32 (96^3) and 16 -> 16 (64^3) slower

# Kernel transform of F(4,3) with interpolation points 0, 1, -1, 2, -2 and infinity: row i combines the 3 taps.
KERNEL_TRANSFORM = torch.tensor(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64
)  # fmt: skip


def winograd_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv3d(x, weight, bias, padding=1)` for a channels-last (N, C, D, H, W) map with W a multiple of 4 and a
    3^3 kernel, through F(4,3) along W; returned channels-last."""
    images, channels, depth, height, width = x.shape
    tiles = width // 4
    # columns 4t + j - 1 of tile t for j = 1..4; j = 0 and 5 are the neighbouring tiles' (zero beyond the edges)
    voxels = x.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C): contiguous for channels-last maps
    d1, d2, d3, d4 = (voxels[:, :, :, j::4] for j in range(4))
    # input transform, the rows of B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
    # [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]] applied to (d0, ..., d5), written in place
    # (pairs of rows share their sums and differences, so no temporaries are needed)
    phases = voxels.new_empty(6, images, depth, height, tiles, channels)
    p0, p1, p2, p3, p4, p5 = phases
    torch.sub(d4, d2, alpha=4, out=p1)
    torch.sub(d3, d1, alpha=4, out=p2)
    p1.add_(p2)  # (d4 - 4 d2) + (d3 - 4 d1)
    torch.sub(p1, p2, alpha=2, out=p2)  # (d4 - 4 d2) - (d3 - 4 d1)
    torch.sub(d4, d2, out=p3)
    torch.sub(d3, d1, out=p4)
    p3.add_(p4, alpha=2)  # (d4 - d2) + 2 (d3 - d1)
    torch.sub(p3, p4, alpha=4, out=p4)  # (d4 - d2) - 2 (d3 - d1)
    torch.sub(d4, d2, alpha=5, out=p0)
    p0[:, :, :, 1:].add_(d4[:, :, :, :-1], alpha=4)  # 4 d0: column 4t - 1 is the previous tile's d4
    torch.mul(d1, 4, out=p5)
    p5.sub_(d3, alpha=5)
    p5[:, :, :, :-1].add_(d1[:, :, :, 1:])  # d5: column 4t + 4 is the next tile's d1
    kernels = torch.einsum("pk,ocabk->pocab", KERNEL_TRANSFORM, weight.double()).float()[..., None]
    # the bias enters through the product with output weight 1 in every column (A^T's column 1)
    m0, m1, m2, m3, m4, m5 = (
        F.conv3d(
            phase.permute(0, 4, 1, 2, 3),
            kernel.contiguous(memory_format=torch.channels_last_3d),
            bias if i == 1 else None,
            padding=(1, 1, 0),
        ).permute(0, 2, 3, 4, 1)
        for i, (phase, kernel) in enumerate(zip(phases, kernels))
    )
    del phases, p0, p1, p2, p3, p4, p5  # before the output is allocated, which may then reuse their memory
    # output transform A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    m1.add_(m2)  # m1 + m2
    torch.sub(m1, m2, alpha=2, out=m2)  # m1 - m2
    m3.add_(m4)  # m3 + m4
    torch.sub(m3, m4, alpha=2, out=m4)  # m3 - m4
    out = voxels.new_empty(images, depth, height, width, weight.shape[0])
    columns = [out[:, :, :, j::4] for j in range(4)]
    torch.add(m0, m1, out=columns[0]).add_(m3)
    torch.add(m2, m4, alpha=2, out=columns[1])
    torch.add(m1, m3, alpha=4, out=columns[2])
    torch.add(m2, m4, alpha=8, out=columns[3]).add_(m5)
    return out.permute(0, 4, 1, 2, 3)


class WinogradConv3d(nn.Conv3d):
    """`nn.Conv3d` (3^3, stride 1, padding 1) that runs float32 inference on large channels-last CPU maps through
    `winograd_conv3d`; otherwise PyTorch's convolution."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if takes_winograd(x):
            return winograd_conv3d(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


def takes_winograd(x: torch.Tensor) -> bool:
    """Whether `x` is a map `winograd_conv3d` computes, and faster than PyTorch's convolution."""
    return (
        x.dim() == 5
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and x.shape[1] >= MIN_CHANNELS
        and x.shape[-1] % 4 == 0
        and x.shape[2:].numel() >= MIN_VOXELS
    )


def is_swappable(module: nn.Module) -> bool:
    """Whether `module` is a plain 3^3 convolution with stride 1 and zero padding 1."""
    return (
        type(module) is nn.Conv3d
        and module.kernel_size == (3, 3, 3)
        and module.stride == (1, 1, 1)
        and module.padding == (1, 1, 1)
        and module.dilation == (1, 1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_winograd(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Returns `network`, whose plain 3^3 convolutions become `WinogradConv3d`s in place when `enabled`."""
    if enabled:
        swapped = [module for module in network.modules() if is_swappable(module)]
        for module in swapped:
            module.__class__ = WinogradConv3d
        logger.info(f"cpu_winograd: {len(swapped)} 3^3 convolutions compute large maps with Winograd's F(4,3).")
    return network
