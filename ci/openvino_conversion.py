"""Seconds to convert the paper-sized network (feature 48, one 96³ window) to OpenVINO, the bundles' way
(`scripts.openvino_engine.convert`: tracing without PyTorch's `check_trace`) against `openvino.convert_model`'s own
tracing, and how far each conversion's output
is from PyTorch's on one random window (docs/performance.md, "CPU inference through OpenVINO").

    python ci/openvino_conversion.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import openvino
import torch
from monai.networks.nets import SwinUNETR

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "swin_unetr_btcv")


def measure(threads: int) -> None:
    """Prints one JSON line per way of converting: seconds to convert and the largest difference from PyTorch.

    Args:
        threads: PyTorch's and OpenVINO's thread count.
    """
    sys.path.insert(0, BUNDLE)
    from scripts.openvino_engine import convert

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = SwinUNETR(1, 14, feature_size=48).eval()
    example = torch.zeros(1, 1, 96, 96, 96)
    window = torch.randn(example.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(window)
    ways = {
        "bundles (check_trace off)": lambda: convert(network, tuple(example.shape)),
        "convert_model's own tracing": lambda: openvino.convert_model(
            network, example_input=example, input=[tuple(example.shape)]
        ),
    }
    for way, converting in ways.items():
        start = time.perf_counter()
        with torch.no_grad():
            converted = converting()
        seconds = time.perf_counter() - start
        compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads})
        output = torch.from_numpy(compiled(window.numpy())[0])
        error = (output - expected).abs().max().item()
        print(json.dumps({"way": way, "threads": threads, "convert_s": round(seconds, 1), "max_abs_error": error}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    measure(parser.parse_args().threads)
