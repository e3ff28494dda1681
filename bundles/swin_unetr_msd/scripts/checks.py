"""Early checks of settings whose mistakes would otherwise surface only after data loading."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
