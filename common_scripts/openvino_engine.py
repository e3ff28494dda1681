"""CPU inference through OpenVINO: the network converted once per checkpoint, cached on disk, run by OpenVINO.

OpenVINO's CPU plugin fuses and schedules the whole graph for the processor it runs on, which the PyTorch path can
only approach with hand-written rewrites (`cpu_network.py`). `use_openvino` keeps the network a PyTorch module, so
checkpoint loaders, sliding-window inferers and MONAI Label use it unchanged, and replaces its `forward`: at the
first call (after the weights are loaded) the network is converted for that input shape, or read back from
`cache_dir` when a conversion of the same weights exists. The cache is keyed by the weights' content, so a new
`model.pt` never runs against a stale conversion, and weights loaded later into the same module are noticed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from .atomic_files import partial_path

logger = logging.getLogger(__name__)
PRECISIONS = ("f32", "bf16")


def weights_key(network: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A digest of the network's parameters and buffers (names, shapes, values), the input shape and the OpenVINO
    version: what a conversion depends on (the precision is chosen when the conversion is compiled).

    Args:
        network: the PyTorch network.
        input_shape: the shape of the input the conversion is for.
    """
    import openvino

    digest = hashlib.sha256(f"{openvino.__version__}|{tuple(input_shape)}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())  # in C order, whatever the memory format
    return digest.hexdigest()[:32]


class _PyTorchForward(nn.Module):
    """The network's own forward, for the converter to trace (the network's `forward` is replaced)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.network).forward(self.network, x)


def convert(network: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """The network's own forward converted to an OpenVINO model for inputs of `input_shape`, traced in float32 even
    under the bfloat16 autocast of `--amp True` (the precision is OpenVINO's, chosen at compilation).

    Args:
        network: the PyTorch network (on the CPU).
        input_shape: the shape of the input the conversion is for.
    """
    import openvino
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        example = torch.zeros(input_shape)
        # OpenVINO's tracing decoder as `convert_model` builds it, less PyTorch's default `check_trace`: a second
        # trace and two more forward passes, checking for branches that this network does not have
        decoder = TorchScriptPythonDecoder(
            _PyTorchForward(network).eval(), example_input=example, trace_kwargs={"check_trace": False}
        )
        return openvino.convert_model(decoder, example_input=example, input=[tuple(input_shape)])


def _weights_version(network: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or written in place (e.g. by `load_state_dict`)."""
    return tuple((id(t), t._version) for t in network.state_dict(keep_vars=True).values())


class OpenVINOForward:
    """The replacement `forward`: runs the compiled OpenVINO model for the input's shape, converting (or reading
    the cached conversion) when the shape or the weights are new.

    Args:
        network: the PyTorch network (on the CPU, in eval mode).
        cache_dir: where conversions are kept, one folder per key (`weights_key`).
        precision: `f32`, or `bf16` for OpenVINO's bfloat16 inference where the CPU has it.
    """

    def __init__(self, network: nn.Module, cache_dir: str, precision: str = "f32") -> None:
        import openvino

        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}.")
        self.network, self.cache_dir, self.precision = network, cache_dir, precision
        self.core = openvino.Core()
        # OpenVINO's own cache of compiled models, so later runs skip most of the compilation; one per precision:
        # OpenVINO 2026.4 names the cached blob alike for both, and a float32 blob compiled for bfloat16 crashes
        self.core.set_property({"CACHE_DIR": os.path.join(cache_dir, f"compiled_{precision}")})
        self.compiled: dict[tuple[int, ...], Any] = {}
        self.version: tuple | None = None

    def model_path(self, input_shape: tuple[int, ...]) -> str:
        """The cached conversion for this input shape and the network's current weights (written if missing)."""
        import openvino

        key = weights_key(self.network, input_shape)
        folder = os.path.join(self.cache_dir, key)
        path = os.path.join(folder, "model.xml")
        if os.path.isfile(path):
            logger.info(f"OpenVINO: using the conversion of these weights in {folder}")
            return path
        logger.info(f"OpenVINO: converting the network for input {list(input_shape)} (once per checkpoint) to {folder}")
        os.makedirs(self.cache_dir, exist_ok=True)
        partial = partial_path(folder)  # a folder renamed into place: both files appear together or not at all
        shutil.rmtree(partial, ignore_errors=True)
        try:
            openvino.save_model(
                convert(self.network, input_shape), os.path.join(partial, "model.xml"), compress_to_fp16=False
            )
            try:
                os.rename(partial, folder)
            except OSError:  # another process wrote the same conversion first
                if not os.path.isfile(path):
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        version = _weights_version(self.network)
        if version != self.version:  # new weights (e.g. the checkpoint loaded after the network was built)
            self.compiled, self.version = {}, version
        shape = tuple(x.shape)
        if shape not in self.compiled:
            config = {
                "INFERENCE_PRECISION_HINT": self.precision,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            }
            self.compiled[shape] = self.core.compile_model(self.model_path(shape), "CPU", config)
        inputs = x.detach().to("cpu", torch.float32).contiguous().numpy()
        output = self.compiled[shape](inputs)[0]
        return torch.from_numpy(output.copy()).to(x.device)


def openvino_available() -> bool:
    """Whether the `openvino` package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def use_openvino(network: nn.Module, cache_dir: str, precision: str = "f32") -> nn.Module:
    """Returns `network` (in eval mode) with its `forward` run by OpenVINO (`OpenVINOForward`).

    Args:
        network: a PyTorch network on the CPU.
        cache_dir: where the conversions are kept.
        precision: `f32`, or `bf16` for bfloat16 inference.
    """
    network.eval()
    network.forward = OpenVINOForward(network, cache_dir, precision)
    return network
