# Copied from common_scripts/image_writer.py by ci/sync_scripts.py: edit that file, then run the script.
"""NIfTI output that never appears half-written.

MONAI's NibabelWriter saves straight to the final file name, so a run killed mid-write leaves a truncated
segmentation that looks like a finished one. This writer saves beside it under a temporary name and renames it into
place (`atomic_files`); the log names the final file.
"""

from __future__ import annotations

import logging
import os

from monai.config import PathLike
from monai.data import NibabelWriter

from .atomic_files import atomic_path


class AtomicNibabelWriter(NibabelWriter):
    """NibabelWriter whose `write` leaves either the complete file at `filename` or nothing."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        with atomic_path(os.fspath(filename)) as partial:
            super().write(partial, verbose=False, **obj_kwargs)
        if verbose:
            logging.getLogger(__name__).info(f"written: {filename}")
