# Copied from common_scripts/cpu_network.py by ci/sync_scripts.py: edit that file, then run the script.
"""The network rewrites for CPU training and inference, applied where the configs build the network, each switched
by its own `cpu_*` setting. Each changes how the network computes, not its parameters: checkpoints load either way.
"""

from __future__ import annotations

import logging

from torch import nn

from .fast_norm import use_fast_norm
from .fused_input_block import fuse_input_block
from .fused_upsampling import fuse_upsampling
from .openvino_engine import openvino_available, use_openvino
from .window_attention import chunk_window_attention
from .winograd_conv import use_winograd

ENGINES = ("torch", "openvino")
logger = logging.getLogger(__name__)


def for_cpu_training(
    network: nn.Module, attention_chunk_mb: float | None = None, fused_upsampling: bool = True
) -> nn.Module:
    """Returns `network` with the rewrites that support gradients applied in place.

    Args:
        network: a MONAI SwinUNETR.
        attention_chunk_mb: the most megabytes of attention weights computed at a time (`window_attention.py`);
            None computes all windows at once.
        fused_upsampling: fold each decoder upsampling into the convolution after it (`fused_upsampling.py`).
    """
    chunk_window_attention(network, attention_chunk_mb)
    return fuse_upsampling(network, fused_upsampling)


def for_cpu_inference(
    network: nn.Module,
    fast_norm: bool = True,
    fused_upsampling: bool = True,
    fused_input_block: bool = True,
    winograd: bool = True,
    engine: str = "torch",
    engine_cache_dir: str | None = None,
    engine_precision: str = "f32",
) -> nn.Module:
    """Returns `network` with the inference rewrites applied in place, or, with `engine="openvino"` on the CPU, run
    by OpenVINO instead (`openvino_engine.py`; the rewrites then do not apply).

    Args:
        network: a MONAI SwinUNETR.
        fast_norm: instance norms through the group-norm kernel (`fast_norm.py`).
        fused_upsampling: fold each decoder upsampling into the convolution after it (`fused_upsampling.py`).
        fused_input_block: the full-resolution input block as one computation (`fused_input_block.py`).
        winograd: Winograd F(4,3) for the 3^3 convolutions that gain from it (`winograd_conv.py`).
        engine: `torch`, or `openvino` to run the network through OpenVINO on the CPU (ignored on a GPU).
        engine_cache_dir: where OpenVINO's conversions are kept (needed with `openvino`).
        engine_precision: OpenVINO's inference precision, `f32` or `bf16`.
    """
    if engine not in ENGINES:
        raise ValueError(f"cpu_inference_engine must be one of {ENGINES}, got {engine!r}.")
    on_cpu = all(p.device.type == "cpu" for p in network.parameters())
    if engine == "openvino" and on_cpu:
        if engine_cache_dir is None:
            raise ValueError("cpu_inference_engine 'openvino' needs engine_cache_dir, the folder for its conversions.")
        if openvino_available():
            return use_openvino(network, engine_cache_dir, engine_precision)
        logger.warning("cpu_inference_engine is 'openvino' but openvino is not installed: PyTorch runs the network.")
    use_fast_norm(network, fast_norm)
    fuse_upsampling(network, fused_upsampling)
    fuse_input_block(network, fused_input_block)
    return use_winograd(network, winograd)
