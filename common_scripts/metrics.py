"""Surface-distance metrics in millimetres.

MONAI's HausdorffDistanceMetric and SurfaceDiceMetric take a `spacing` argument, but its ignite handlers call
them without one, so distances would come out in voxels. These subclasses read each label's voxel spacing from
its MetaTensor affine, so `IgniteMetricHandler(metric_fn=...)` reports millimetres.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric


def voxel_spacing(y: torch.Tensor) -> list[list[float]] | None:
    """Per-item voxel spacing of a batched MetaTensor (None for a plain tensor: voxels then)."""
    if not isinstance(y, MetaTensor):
        return None
    affines = y.affine if y.affine.ndim == 3 else y.affine[None].expand(y.shape[0], -1, -1)
    spatial_dims = y.ndim - 2
    return [affine_to_spacing(a, r=spatial_dims).tolist() for a in affines]


class _SpacingFromMeta:
    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("spacing") is None:
            kwargs["spacing"] = voxel_spacing(y)
        return super()._compute_tensor(y_pred, y, **kwargs)  # type: ignore[misc]


class HausdorffDistanceMM(_SpacingFromMeta, HausdorffDistanceMetric):
    """HausdorffDistanceMetric in millimetres (spacing from the label's affine)."""


class SurfaceDiceMM(_SpacingFromMeta, SurfaceDiceMetric):
    """SurfaceDiceMetric (normalised surface distance) with tolerances in millimetres."""
