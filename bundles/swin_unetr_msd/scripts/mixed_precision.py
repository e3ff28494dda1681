# Copied from common_scripts/mixed_precision.py by ci/sync_scripts.py: edit that file, then run the script.
"""Mixed precision for the forward pass on CPUs that compute in bfloat16 natively.

MONAI's engines apply AMP through `torch.autocast("cuda")` only, so on a CPU their `amp` flag does nothing. On CPUs
with AVX512-BF16 or AMX (and ARM CPUs with BF16), oneDNN runs convolutions and matrix products about twice as fast
in bfloat16 and activations take half the memory. `AutocastInferer` runs a MONAI inferer under
`torch.autocast("cpu", dtype=torch.bfloat16)` and hands back float32 outputs, so that the loss and the backward pass
stay outside autocast, as PyTorch recommends for AMP. bfloat16 has float32's exponent range, so no gradient scaler is
needed. The train configs use it by default (`amp`); the inference configs only with `--amp True`, because bfloat16
probabilities differ from float32 ones by up to a few hundredths and flip the label of voxels near a tie.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch
from monai.inferers import Inferer
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

# oneDNN's bfloat16 convolution backward (seen with torch 2.13 CPU) reads uninitialised memory when the input has only
# a few voxels, e.g. the 2x2x2 SwinUNETR bottleneck of a 64^3 patch: the weight gradient then holds NaN at random
# (about one step in three on a replayed case) and training goes NaN. Such convolutions cost next to nothing, so
# they run in float32.
FLOAT32_BELOW_VOXELS = 64


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86: AVX512-BF16 or AMX; ARM: oneDNN's BF16 check)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _to_float32(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: _to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(value) for value in outputs)
    return outputs


def _float32_on_small_inputs(network: torch.nn.Module) -> list[RemovableHandle]:
    """Hooks making `network`'s convolutions on inputs under `FLOAT32_BELOW_VOXELS` voxels leave autocast."""

    def enter(module: torch.nn.Module, args: tuple) -> tuple | None:
        if args[0].shape[2:].numel() >= FLOAT32_BELOW_VOXELS:
            return None
        module._float32_scope = torch.autocast("cpu", enabled=False)
        module._float32_scope.__enter__()
        return (args[0].float(),) + tuple(args[1:])

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        scope = module.__dict__.pop("_float32_scope", None)
        if scope is not None:
            scope.__exit__(None, None, None)

    handles = []
    for module in network.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


class AutocastInferer(Inferer):
    """Runs `inferer` under CPU bfloat16 autocast when `enabled` and the CPU has native bfloat16; outputs in float32.

    Args:
        inferer: the MONAI inferer doing the work (e.g. `SimpleInferer`).
        enabled: the bundle's `amp` setting restricted to CPU devices; on a CPU without native bfloat16 it logs
            once and computes in float32 (emulated bfloat16 would be slower than float32).
    """

    def __init__(self, inferer: Inferer, enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.enabled = bool(enabled) and cpu_has_native_bfloat16()
        if self.enabled:
            logger.info("amp: the forward pass runs under bfloat16 autocast on this CPU")
        elif enabled:
            logger.info("amp: this CPU has no native bfloat16 (AVX512-BF16/AMX); the forward pass computes in float32")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        handles = _float32_on_small_inputs(network)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = self.inferer(inputs, network, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return _to_float32(outputs)
