"""Label maps from class probabilities, as the validation and inference postprocessing need them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform


class ArgmaxLabelsd(MapTransform):
    """MONAI's `AsDiscreted(argmax=True)` for one channel-first image: the index of the largest class, as float32.

    `torch.argmax` over the class dimension is several times slower on a CPU than the indices of `torch.max`, which
    are the same labels (the first maximum on ties).

    Args:
        keys: the keys of the probability maps to turn into label maps.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key].max(0, keepdim=True).indices.float()
        return d
