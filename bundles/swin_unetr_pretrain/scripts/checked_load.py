"""Loading unlabelled volumes with the file named in every error.

Pre-training sets run to thousands of CTs and are usually not cached, so each volume is checked where it is read
anyway rather than in a pass of its own. MONAI's `LoadImaged` lets a truncated file fail as a bare `EOFError`, and
a 2-D, multi-channel or non-finite volume only fails (or silently trains on NaN) steps later; this loader names the
file and what is wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import LoadImaged


class CheckedLoadImaged(LoadImaged):
    """`LoadImaged` (channel first) that raises a ValueError naming the file when a volume cannot be read, is not a
    single-channel 3-D volume of at least 2 voxels per side, or holds NaN or infinite values.

    Args:
        keys: the keys whose files are loaded.
        kwargs: the other arguments of `LoadImaged`.
    """

    def __init__(self, keys: Any, **kwargs: Any) -> None:
        super().__init__(keys, ensure_channel_first=True, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        paths = {key: data[key] for key in self.keys if key in data}
        try:
            loaded = super().__call__(data, reader)
        except Exception as error:  # each reader raises its own kinds
            names = ", ".join(repr(path) for path in paths.values())
            raise ValueError(
                f"image {names} cannot be read ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
            ) from error
        for key, path in paths.items():
            image = loaded[key]
            if image.ndim != 4 or image.shape[0] != 1 or min(image.shape[1:]) < 2:
                raise ValueError(f"image {path!r} has shape {tuple(image.shape[1:])} with {image.shape[0]} "
                                 "channel(s); pre-training needs single-channel 3-D volumes.")  # fmt: skip
            non_finite = int((~torch.isfinite(torch.as_tensor(image))).sum())
            if non_finite:
                raise ValueError(f"image {path!r} holds {non_finite} NaN or infinite voxels.")
        return loaded
