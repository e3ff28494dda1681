# Copied from common_scripts/fused_upsampling.py by ci/sync_scripts.py: edit that file, then run the script.
"""SwinUNETR's last decoder block with its transposed convolution folded into the convolutions after it, for faster
inference and training on a CPU with the same outputs and gradients.

MONAI's `UnetrUpBlock` upsamples its input with a 2^3 stride-2 transposed convolution, concatenates the skip map and
runs a `UnetResBlock`, whose first 3^3 convolution and 1^3 residual convolution read the concatenation. All three are
linear, so what the two convolutions make of the upsampled half is itself a transposed convolution of the
half-resolution input: 4^3 taps, stride 2 and padding 1 for the 3^3 convolution (per dimension, upsampling tap q
and convolution tap k meet in tap q - k + 2), 2^3 taps for the residual one. On a full-resolution block (SwinUNETR's
`decoder1`, feature 48, 96^3 window) this replaces 114 GFLOP of the 3^3 convolution and the upsampling by 33 GFLOP
and drops the full-resolution upsampled map and concatenation: oneDNN's convolutions already run near the float32
peak of a CPU, so less arithmetic is what makes them faster (measurements: `docs/performance.md` in the repository).

Only blocks where the folded convolution does at most half the arithmetic are folded (input channels at most 27/16 of
the upsampled channels: `decoder1`). SwinUNETR's other decoder blocks upsample twice as many channels as they keep:
folded, `decoder2` was no faster and `decoder3` to `decoder5` slower (composing their larger weights costs
more than it saves on their smaller maps). Weights are composed on every call, so they
follow any checkpoint loaded after the swap, and in training the gradients flow through the composition to the
block's own weights; the backward pass keeps neither the upsampled map nor the concatenation, which lowers the
peak memory of a fine-tuning step. Parameter names and values are unchanged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock, UnetrUpBlock
from torch import nn

logger = logging.getLogger(__name__)


def tap_map() -> torch.Tensor:
    """(64 taps m, 8 taps q, 27 taps k): 1 where the 2^3 stride-2 transposed convolution's tap q followed by the 3^3
    convolution's tap k (padding 1) is tap m of one 4^3 stride-2 transposed convolution with padding 1."""
    line = torch.zeros(4, 2, 3)  # per dimension: up[2i + q] feeds out[2i + q - k + 1], i.e. tap q - k + 2 of padding 1
    for q, k in itertools.product(range(2), range(3)):
        line[q - k + 2, q, k] = 1
    return torch.einsum("adg,beh,cfi->abcdefghi", line, line, line).reshape(64, 8, 27)


TAP_MAP = tap_map()


class FusedUnetrUpBlock(UnetrUpBlock):
    """`UnetrUpBlock` whose transposed convolution is folded into the residual block's first and residual
    convolutions (see the module's docstring); the same outputs and gradients within float rounding."""

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        block = self.conv_block
        upsample = self.transp_conv.conv.weight  # (in, up, 2, 2, 2)
        first, residual = block.conv1.conv.weight, block.conv3.conv.weight  # (out, up + skip, k, k, k)
        up = upsample.shape[1]
        with torch.autocast(inp.device.type, enabled=False):  # composed in the weights' precision
            pairs = torch.einsum("omk,imq->oikq", first[:, :up].flatten(2), upsample.flatten(2))
            folded = torch.einsum("oikq,mqk->iom", pairs, TAP_MAP.to(pairs)).unflatten(2, (4, 4, 4))
            folded_residual = torch.einsum("om,imq->ioq", residual[:, :up, 0, 0, 0], upsample.flatten(2))
        out = F.conv_transpose3d(inp, folded, stride=2, padding=1)
        out += block.conv1.conv._conv_forward(skip, first[:, up:], None)  # the skip's half, as the layer would run it
        out = block.norm2(block.conv2(block.lrelu(block.norm1(out))))
        shortcut = F.conv_transpose3d(inp, folded_residual.unflatten(2, (2, 2, 2)), stride=2)
        shortcut += F.conv3d(skip, residual[:, up:])
        out += block.norm3(shortcut)
        return block.lrelu(out)


def is_plain_conv(layer: nn.Module, kind: type, kernel: int, stride: int, padding: int) -> bool:
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
        is_plain_conv(module.transp_conv, nn.ConvTranspose3d, 2, 2, 0)
        and is_plain_conv(block.conv1, nn.Conv3d, 3, 1, 1)
        and hasattr(block, "conv3")
        and is_plain_conv(block.conv3, nn.Conv3d, 1, 1, 0)
    ):
        return False
    upsample = module.transp_conv.conv
    return 16 * upsample.in_channels <= 27 * upsample.out_channels


def swap_blocks(network: nn.Module, foldable: Callable[[nn.Module], bool], fused_class: type) -> list[str]:
    """Turns the `foldable` submodules of `network` into `fused_class` in place; returns their names. The fused classes
    only override `forward`, so parameters and checkpoints are the same either way."""
    fused = [name for name, module in network.named_modules() if foldable(module)]
    for name in fused:
        network.get_submodule(name).__class__ = fused_class
    return fused


def fuse_upsampling(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Returns `network`, whose foldable `UnetrUpBlock`s become `FusedUnetrUpBlock`s in place when `enabled`."""
    if enabled:
        fused = swap_blocks(network, is_foldable, FusedUnetrUpBlock)
        where = fused or "no block"
        logger.info(f"cpu_fused_upsampling: transposed convolution folded into the next convolutions in {where}.")
    return network
