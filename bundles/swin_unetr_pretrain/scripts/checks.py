# Copied from common_scripts/checks.py by ci/sync_scripts.py: edit that file, then run the script.
"""Early checks of settings whose mistakes would otherwise surface only after data loading."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

# SwinUNETR halves the resolution five times (patch embedding + four merging stages).
SWIN_DIVISOR = 32


def check_roi_size(roi_size: Sequence[int], name: str = "roi_size") -> list[int]:
    """Returns `roi_size` as a list of 3 ints; raises ValueError naming the setting if SwinUNETR cannot take it."""
    sizes = list(roi_size) if isinstance(roi_size, Sequence) and not isinstance(roi_size, str) else [roi_size]
    if len(sizes) != 3 or any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"{name} must be 3 positive integers, got {roi_size!r}.")
    bad = [s for s in sizes if s % SWIN_DIVISOR]
    if bad:
        raise ValueError(
            f"{name}={sizes} is not divisible by {SWIN_DIVISOR} (SwinUNETR downsamples 5 times); "
            f"use e.g. {[math.ceil(s / SWIN_DIVISOR) * SWIN_DIVISOR for s in sizes]}."
        )
    return sizes


def check_patches_per_pass(patches_per_pass: int | None) -> int | None:
    """Returns `cpu_patches_per_pass` (patches or sub-volumes per network pass; None: the whole batch at once), or
    raises ValueError naming the setting."""
    if patches_per_pass is not None and (
        isinstance(patches_per_pass, bool) or not isinstance(patches_per_pass, int) or patches_per_pass < 1
    ):
        raise ValueError(
            f"cpu_patches_per_pass must be a whole number of 1 or more, or null (the whole batch in one pass), "
            f"got {patches_per_pass!r}."
        )
    return patches_per_pass


def check_cases_per_process(num_cases: int, remedy: str, world_size: int | None = None) -> int:
    """Returns `num_cases`, or raises ValueError when a distributed run has fewer validation cases than processes.

    MONAI's `DistributedSampler` stops such a run with "dataset length is less than the number of participating
    ranks" once training has started; this says it before, with what to change.

    Args:
        num_cases: the validation cases.
        remedy: the settings that give more validation cases, as the message names them.
        world_size: the number of processes (default: that of the initialised process group, else 1).
    """
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_cases < world_size:
        raise ValueError(
            f"{num_cases} validation case(s) for {world_size} processes: each process validates at least one; "
            f"{remedy}, or start at most {num_cases} processes."
        )
    return num_cases


def check_flags(**flags: Any) -> dict[str, bool]:
    """Raises unless every yes/no setting is a bool; returns them.

    `python -m monai.bundle run` parses command-line values as Python literals (Fire), so `--amp false` arrives as
    the text 'false', which Python treats as true: the run would silently do the opposite of what was asked.
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            meant = "True" if str(value).strip().lower() in ("true", "1", "yes", "on") else "False"
            raise ValueError(
                f"{name} must be True or False, got {value!r}: on the command line write --{name} {meant} "
                "(capitalised; monai.bundle reads lower-case true/false as text, which counts as true)."
            )
    return flags


def check_tensorrt(device: torch.device | str) -> torch.device:
    """Raises unless TensorRT can run here: a CUDA device and the `tensorrt`, `polygraphy` and `onnx` packages
    that MONAI's `trt_compile` builds the engine with; returns the device. Without them `trt_compile` only warns and
    runs the PyTorch network, so a run meant to measure or ship TensorRT would silently be PyTorch.

    Args:
        device: the `device` setting.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"inference_trt.json needs a CUDA GPU, but device is {device}; use inference.json here.")
    missing = [name for name in ("tensorrt", "polygraphy", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"inference_trt.json needs {', '.join(missing)}: pip install {' '.join(missing)}")
    return device
