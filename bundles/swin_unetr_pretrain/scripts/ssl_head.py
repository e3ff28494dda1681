"""The Swin encoder with the paper's three proxy-task heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from .checks import check_patches_per_pass

NUM_ROTATIONS = 4  # 0, 90, 180, 270 degrees


class SSLHead(nn.Module):
    """SwinUNETR's encoder (`swinViT`, same hyper-parameters and parameter names) plus three heads on the
    bottleneck: a 4-way rotation classifier on the first token, a linear projection for contrastive learning on
    the second token (as in the paper's released code), and a decoder that upsamples the bottleneck 32x back to
    an image for inpainting. A head whose task is switched off is not built and costs nothing.

    `forward` returns a dict with the outputs of the enabled heads: "rotation" (B, 4) logits, "contrastive"
    (B, projection_dim) embeddings and "reconstruction" (B, in_channels, *spatial) images.

    `patches_per_pass` (setting `cpu_patches_per_pass`) runs the encoder on that many sub-volumes at a time (same
    results: the Swin encoder treats every sample on its own). On a CPU this keeps the window-attention tensors, GBs
    each for a batch of 96^3 views, small enough for a memory pool to reuse them; None encodes the whole batch at
    once, fastest on a GPU.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        patch_size: int = 2,
        window_size: int = 7,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        projection_dim: int = 512,
        use_rotation: bool = True,
        use_contrastive: bool = True,
        use_inpainting: bool = True,
        patches_per_pass: int | None = None,
    ) -> None:
        super().__init__()
        self.patches_per_pass = check_patches_per_pass(patches_per_pass)
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(patch_size,) * 3,
            depths=depths,
            num_heads=num_heads,
            drop_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        bottleneck = feature_size * 2 ** len(depths)
        self.rotation_head = nn.Linear(bottleneck, NUM_ROTATIONS) if use_rotation else None
        self.contrastive_head = nn.Linear(bottleneck, projection_dim) if use_contrastive else None
        self.inpainting_head = _upsampling_decoder(bottleneck, in_channels, stages=5) if use_inpainting else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = x.split(self.patches_per_pass) if self.patches_per_pass is not None else [x]
        bottleneck = torch.cat([self.swinViT(part.contiguous())[-1] for part in parts])  # (B, C, D/32, H/32, W/32)
        tokens = bottleneck.flatten(start_dim=2).transpose(1, 2)  # (B, N, C)
        out: dict[str, torch.Tensor] = {}
        if self.rotation_head is not None:
            out["rotation"] = self.rotation_head(tokens[:, 0])
        if self.contrastive_head is not None:
            if not torch.jit.is_tracing() and tokens.shape[1] < 2:  # a trace is checked on its example input
                raise ValueError(
                    f"contrastive head needs at least 2 bottleneck tokens; input {tuple(x.shape[2:])} gives 1."
                )
            out["contrastive"] = self.contrastive_head(tokens[:, 1])
        if self.inpainting_head is not None:
            out["reconstruction"] = self.inpainting_head(bottleneck)
        return out


def _upsampling_decoder(channels: int, out_channels: int, stages: int) -> nn.Sequential:
    """`stages` x (3x3x3 conv, instance norm, leaky ReLU, 2x trilinear upsampling), then a 1x1x1 conv."""
    layers: list[nn.Module] = []
    for _ in range(stages):
        narrower = max(channels // 2, out_channels)
        layers += [
            nn.Conv3d(channels, narrower, kernel_size=3, padding=1),
            nn.InstanceNorm3d(narrower),
            nn.LeakyReLU(),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        ]
        channels = narrower
    layers.append(nn.Conv3d(channels, out_channels, kernel_size=1))
    return nn.Sequential(*layers)
