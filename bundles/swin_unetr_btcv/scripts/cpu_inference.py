"""The network rewrites for faster float32 inference on a CPU (README, Performance), applied in one call so that the
configs switch each with its own setting instead of nesting one call per rewrite. Each changes how the network
computes, not its parameters: checkpoints load either way. This file is a bundle-local copy (identical in the
fine-tuning bundles) so each bundle works when copied alone.
"""

from __future__ import annotations

from torch import nn

from .fast_norm import use_group_norm_kernel
from .fused_input_block import fuse_input_block
from .fused_upsampling import fuse_upsampling
from .winograd_conv import use_winograd


def for_cpu_inference(
    network: nn.Module,
    fast_norm: bool = True,
    fused_upsampling: bool = True,
    fused_input_block: bool = True,
    winograd: bool = True,
) -> nn.Module:
    """Returns `network` with the enabled rewrites applied in place (see each function's module)."""
    use_group_norm_kernel(network, fast_norm)
    fuse_upsampling(network, fused_upsampling)
    fuse_input_block(network, fused_input_block)
    return use_winograd(network, winograd)
