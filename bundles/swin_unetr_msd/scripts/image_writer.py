"""NIfTI output that never appears half-written.

MONAI's NibabelWriter saves straight to the final file name, so a run killed mid-write leaves a truncated
segmentation that looks like a finished one. This writer saves beside it under a temporary name and renames it into
place (an atomic step on one file system).
"""

from __future__ import annotations

import os

from monai.config import PathLike
from monai.data import NibabelWriter


class AtomicNibabelWriter(NibabelWriter):
    """NibabelWriter that writes `<folder>/.partial-<pid>-<name>` first, then renames it to `filename`."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        folder, name = os.path.split(os.fspath(filename))
        partial = os.path.join(folder, f".partial-{os.getpid()}-{name}")
        try:
            super().write(partial, verbose=verbose, **obj_kwargs)
            os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
