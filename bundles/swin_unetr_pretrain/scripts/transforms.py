"""The two augmentations of the paper's views that MONAI has no transform for.

`RandRotate90d` rotates but keeps the number of quarter turns to itself, and `RandCoarseDropoutd` neither bounds
the share of the volume it removes nor fills holes from another sub-volume; the proxy tasks need both.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Rotate90


def check_rotation_plane(roi_size: Sequence[int], rotation_axes: Sequence[int]) -> None:
    """Raises ValueError naming the settings when quarter turns in the `rotation_axes` plane would change the shape
    of a `roi_size` sub-volume (the two sides of that plane must be equal for views to batch)."""
    axes = list(rotation_axes)
    if len(axes) != 2 or len(set(axes)) != 2 or not all(a in (0, 1, 2) for a in axes):
        raise ValueError(f"rotation_axes must be two different spatial axes out of 0, 1, 2, got {rotation_axes!r}.")
    if roi_size[axes[0]] != roi_size[axes[1]]:
        raise ValueError(
            f"roi_size {list(roi_size)} has sides {roi_size[axes[0]]} and {roi_size[axes[1]]} in the rotation plane "
            f"rotation_axes={axes}; they must be equal so that rotated views keep their shape."
        )


class RandRotate90Labeld(Randomizable, MapTransform):
    """Rotates `keys` by the same random k x 90 degrees (k in 0..3) in the plane of `spatial_axes` and stores k as a
    long tensor under `label_key`, the target of the rotation head. The default (0, 1) is the RAS axial plane; the
    paper's released code turns (1, 2), the sagittal plane."""

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_axes: Sequence[int] = (0, 1),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_key = label_key
        self.spatial_axes = tuple(spatial_axes)
        self.k = 0

    def randomize(self, data=None) -> None:
        self.k = int(self.R.randint(4))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        rotate = Rotate90(k=self.k, spatial_axes=self.spatial_axes)  # type: ignore[arg-type]
        for key in self.key_iterator(d):
            d[key] = rotate(d[key])
        d[self.label_key] = torch.tensor(self.k, dtype=torch.long)
        return d


class RandInnerCutoutd(Randomizable, MapTransform):
    """Masks random boxes inside each image of `keys` until they cover its budget, never more.

    The budget is `max_fraction` of the image (`budget="max"`) or, as in the paper's released code, a share drawn
    uniformly from [0, `max_fraction`) for each image (`budget="uniform"`). Each box has sides of 1/16 to
    `max_block_fraction` of the image's; it is filled with Gaussian noise rescaled to [0, 1] or, with probability
    `donor_prob` when `donor_key` is given, with the same box of the donor image (another sub-volume). Boxes that
    would push the covered share past the budget are skipped.
    """

    BUDGETS = ("max", "uniform")

    def __init__(
        self,
        keys: KeysCollection,
        max_fraction: float = 0.3,
        max_block_fraction: float = 0.25,
        donor_key: str | None = None,
        donor_prob: float = 0.5,
        max_tries: int = 100,
        budget: str = "max",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 < max_fraction < 1.0:
            raise ValueError(f"max_fraction must lie in (0, 1), got {max_fraction}.")
        if budget not in self.BUDGETS:
            raise ValueError(f"cutout_budget must be one of {self.BUDGETS}, got {budget!r}.")
        self.budget = budget
        self.max_fraction = max_fraction
        self.max_block_fraction = max_block_fraction
        self.donor_key = donor_key
        self.donor_prob = donor_prob
        self.max_tries = max_tries

    def randomize(self, spatial_shape: Sequence[int]) -> list[tuple[tuple[slice, ...], bool]]:
        """Boxes as (slices, fill_from_donor), their union covering at most `max_fraction` of the image."""
        shape = np.asarray(spatial_shape)
        covered = np.zeros(spatial_shape, dtype=bool)
        share = self.max_fraction if self.budget == "max" else self.R.uniform(0.0, self.max_fraction)
        budget = share * covered.size
        boxes = []
        for _ in range(self.max_tries):
            if covered.sum() >= budget * 0.95:
                break
            lo = np.maximum(shape // 16, 1)
            hi = np.maximum(lo + 1, (shape * self.max_block_fraction).astype(int) + 1)
            size = self.R.randint(lo, hi)
            start = self.R.randint(0, shape - size + 1)
            box = tuple(slice(int(s), int(s + n)) for s, n in zip(start, size))
            added = covered.copy()
            added[box] = True
            if added.sum() > budget:
                continue
            covered = added
            boxes.append((box, self.donor_key is not None and self.R.rand() < self.donor_prob))
        return boxes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key].clone()
            for box, from_donor in self.randomize(image.shape[1:]):
                region = (slice(None),) + box
                if from_donor:
                    image[region] = torch.as_tensor(d[self.donor_key][region], dtype=image.dtype)  # type: ignore[index]
                else:
                    noise = torch.as_tensor(self.R.standard_normal(image[region].shape), dtype=image.dtype)
                    image[region] = (noise - noise.min()) / (noise.max() - noise.min() + 1e-8)
            d[key] = image
        return d
