# Copied from common_scripts/fused_input_block.py by ci/sync_scripts.py: edit that file, then run the script.
"""SwinUNETR's first encoder block on a single-channel image, computed with less memory traffic for faster CPU
inference with the same outputs.

`encoder1` (MONAI's `UnetrBasicBlock` around a `UnetResBlock`) reads the image twice: a 3^3 convolution to
`feature_size` channels, and a 1^3 residual convolution followed by an instance norm. These cost more than their
arithmetic:
- For one image with one channel, PyTorch picks its reference convolution over oneDNN (a size heuristic meant for
  small 2-D maps), and their channels-first outputs then need a copy to channels-last before the next convolution
  and an add across layouts. Here the 3^3 convolution goes through oneDNN.
- The residual branch is a per-channel multiple w_c x of the image, so its instance norm has a closed form,
  w_c (x - mean(x)) / sqrt(w_c^2 var(x) + eps), with the image's statistics taken in float64. It is added in place
  in one pass, instead of a full-resolution convolution output, its norm and the add.
Outputs are within float32 rounding of MONAI's (measurements: `docs/performance.md` in the repository).

Only float32 maps without gradients take this path (inference and evaluation; the opt-in bfloat16 autocast and
training run MONAI's forward). Parameter names and values are unchanged, so checkpoints load either way.
"""

from __future__ import annotations

import logging

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetResBlock
from torch import nn

from .fused_upsampling import is_plain_conv, swap_blocks

logger = logging.getLogger(__name__)


class FusedInputBlock(UnetrBasicBlock):
    """`UnetrBasicBlock` on a single-channel image whose residual branch is normalised in closed form (see the
    module's docstring); MONAI's outputs within float32 rounding."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        onednn = inp.device.type == "cpu" and inp.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        if torch.is_grad_enabled() or torch.is_autocast_enabled(inp.device.type) or not onednn:
            return super().forward(inp)
        block = self.layer
        conv = block.conv1.conv  # called directly: PyTorch's heuristic picks its slow path for one 1-channel image
        out = torch.mkldnn_convolution(inp, conv.weight, None, conv.padding, conv.stride, conv.dilation, 1)
        out = block.norm2(block.conv2(block.lrelu(block.norm1(out))))
        norm = block.norm3
        variance, mean = torch.var_mean(inp.flatten(1).double(), 1, correction=0)  # (N,)
        weight = block.conv3.conv.weight.flatten().double()  # (C,)
        scale = weight / torch.sqrt(weight.square() * variance[:, None] + norm.eps)  # (N, C)
        if norm.affine:
            scale = scale * norm.weight.double()
        shift = -mean[:, None] * scale
        if norm.affine:
            shift = shift + norm.bias.double()
        voxels = out.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C): contiguous for channels-last maps
        image = inp.permute(0, 2, 3, 4, 1)  # (N, D, H, W, 1)
        voxels.addcmul_(image, scale.float()[:, None, None, None]).add_(shift.float()[:, None, None, None])
        return block.lrelu(out)


def is_foldable(module: nn.Module) -> bool:
    """Whether `module` is a 3-D `UnetrBasicBlock` of the kind SwinUNETR builds for a single-channel image."""
    if type(module) is not UnetrBasicBlock or type(module.layer) is not UnetResBlock:
        return False
    block = module.layer
    norm = getattr(block, "norm3", None)
    return (
        is_plain_conv(block.conv1, nn.Conv3d, 3, 1, 1)
        and block.conv1.conv.in_channels == 1
        and hasattr(block, "conv3")
        and is_plain_conv(block.conv3, nn.Conv3d, 1, 1, 0)
        and isinstance(norm, nn.InstanceNorm3d)
        and not norm.track_running_stats
    )


def fuse_input_block(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Returns `network`, whose foldable `UnetrBasicBlock`s become `FusedInputBlock`s in place when `enabled`."""
    if enabled:
        fused = swap_blocks(network, is_foldable, FusedInputBlock)
        logger.info(f"cpu_fused_input_block: residual instance norm in closed form in {fused or 'no block'}.")
    return network
