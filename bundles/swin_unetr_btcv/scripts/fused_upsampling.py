"""SwinUNETR's last decoder block with its transposed convolution folded into the convolutions after it, for faster
inference on a CPU with the same outputs.

MONAI's `UnetrUpBlock` upsamples its input with a 2^3 stride-2 transposed convolution, concatenates the skip map and
runs a `UnetResBlock`, whose first 3^3 convolution and 1^3 residual convolution read the concatenation. All three are
linear, so what the two convolutions make of the upsampled half is itself a convolution of the half-resolution input:
a 2^3 convolution for each of the 8 parities of an output voxel (and a transposed convolution for the residual). On a
full-resolution block (SwinUNETR's `decoder1`, feature 48, 96^3 window) this replaces 114 GFLOP at full resolution
by 35 GFLOP at half resolution and drops the 340 MB concatenation: oneDNN's convolutions already run near the float32
peak of a CPU, so less arithmetic is what makes them faster (`decoder1` ~1.1 instead of ~1.35-1.45 s a window on 2
cores, a 128 x 128 x 96 CT ~7% faster; README, Performance).

Only blocks where the folded convolution does at most half the arithmetic are folded (input channels at most 27/16 of
the upsampled channels: `decoder1`). SwinUNETR's other decoder blocks upsample twice as many channels as they keep:
folded, `decoder2` measured no faster and `decoder3` to `decoder5` slower (composing their larger weights costs
more than it saves on their smaller maps). Weights are composed on every call (milliseconds for `decoder1`), so they
follow any checkpoint loaded after the swap; with gradients (training) MONAI's forward runs. Parameter
names and values are unchanged. This file is a bundle-local copy (identical in the fine-tuning bundles) so each bundle
works when copied alone.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock, UnetrUpBlock
from torch import nn

logger = logging.getLogger(__name__)

PARITIES = list(itertools.product((0, 1), repeat=3))  # output voxel (2i + d, 2j + h, 2k + w), in kernel order


def tap_map() -> torch.Tensor:
    """(8 parities, 8 taps t, 8 taps q, 27 taps k): 1 where the 3^3 convolution's tap k, at an output voxel of that
    parity, reads the transposed convolution's tap q of the half-resolution voxel under tap t of a 2^3 convolution on
    the input padded by one voxel."""
    line = torch.zeros(2, 2, 2, 3)  # per dimension: fine voxel 2i + p + k - 1 is upsampled from input voxel j, tap q
    for p, k in itertools.product(range(2), range(3)):
        line[p, (p + k - 1) // 2 + 1 - p, (p + k - 1) % 2, k] = 1  # j = i + t - 1 + p on the padded input
    return torch.einsum("adgj,behk,cfil->abcdefghijkl", line, line, line).reshape(8, 8, 8, 27)


TAP_MAP = tap_map()


class FusedUnetrUpBlock(UnetrUpBlock):
    """`UnetrUpBlock` whose transposed convolution is folded into the residual block's first and residual
    convolutions when no gradients are recorded (see the module's docstring); the same outputs within float rounding."""

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(inp, skip)
        block = self.conv_block
        upsample = self.transp_conv.conv.weight  # (in, up, 2, 2, 2)
        first, residual = block.conv1.conv.weight, block.conv3.conv.weight  # (out, up + skip, k, k, k)
        up, out_channels = upsample.shape[1], first.shape[0]
        with torch.autocast(inp.device.type, enabled=False):  # composed in the weights' precision
            pairs = torch.einsum("omk,imq->oikq", first[:, :up].flatten(2), upsample.flatten(2))
            folded = torch.einsum("oikq,ptqk->poit", pairs, TAP_MAP.to(pairs)).reshape(8 * out_channels, -1, 2, 2, 2)
            folded_residual = torch.einsum("om,imq->ioq", residual[:, :up, 0, 0, 0], upsample.flatten(2))
        out = F.conv3d(skip, first[:, up:], padding=1)
        by_parity = F.conv3d(F.pad(inp, (1,) * 6), folded)  # one voxel larger than `inp` along each dimension
        size = inp.shape[2:]
        for index, (d, h, w) in enumerate(PARITIES):
            channels = slice(index * out_channels, (index + 1) * out_channels)
            out[:, :, d::2, h::2, w::2] += by_parity[:, channels, d : d + size[0], h : h + size[1], w : w + size[2]]
        out = block.norm2(block.conv2(block.lrelu(block.norm1(out))))
        shortcut = F.conv_transpose3d(inp, folded_residual.unflatten(2, (2, 2, 2)), stride=2)
        shortcut += F.conv3d(skip, residual[:, up:])
        out += block.norm3(shortcut)
        return block.lrelu(out)


def _only_conv(layer: nn.Module, kind: type, kernel: int, stride: int, padding: int) -> bool:
    """Whether MONAI's `Convolution` `layer` is a bias-free `kind` convolution and nothing else."""
    conv = getattr(layer, "conv", None)
    return (
        len(list(layer.children())) == 1
        and type(conv) is kind
        and conv.kernel_size == (kernel,) * 3
        and conv.stride == (stride,) * 3
        and conv.padding == (padding,) * 3
        and conv.dilation == (1,) * 3
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and getattr(conv, "output_padding", (0,) * 3) == (0,) * 3
    )


def is_foldable(module: nn.Module) -> bool:
    """Whether `module` is a 3-D `UnetrUpBlock` of the kind SwinUNETR builds whose folding halves the arithmetic."""
    if type(module) is not UnetrUpBlock or type(module.conv_block) is not UnetResBlock:
        return False
    block = module.conv_block
    if not (
        _only_conv(module.transp_conv, nn.ConvTranspose3d, 2, 2, 0)
        and _only_conv(block.conv1, nn.Conv3d, 3, 1, 1)
        and hasattr(block, "conv3")
        and _only_conv(block.conv3, nn.Conv3d, 1, 1, 0)
    ):
        return False
    upsample = module.transp_conv.conv
    return 16 * upsample.in_channels <= 27 * upsample.out_channels


def fuse_upsampling(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Returns `network`, whose foldable `UnetrUpBlock`s become `FusedUnetrUpBlock`s in place when `enabled`."""
    if not enabled:
        return network
    fused = [name for name, module in network.named_modules() if is_foldable(module)]
    for name in fused:
        network.get_submodule(name).__class__ = FusedUnetrUpBlock  # same parameters: checkpoints load either way
    logger.info(f"cpu_fused_upsampling: transposed convolution folded into the next convolutions in {fused or 'no block'}.")
    return network
