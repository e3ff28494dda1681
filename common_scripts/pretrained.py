"""Initialising SwinUNETR's encoder from a self-supervised `model_swinvit.pt`, loudly.

`SwinUNETR.load_from` copies the encoder but says nothing about what it loaded and fails deep inside with an
unnamed shape error when the file does not fit. This loader checks every encoder tensor first, names the file
and the first mismatch, and logs how many tensors it loaded, so fine-tuning never starts from random weights
by accident.

The released encoder was pre-trained on single-channel CT. For a network with C > 1 input channels (multi-sequence
MRI), the patch-embedding kernel is repeated over the C channels and divided by C: the first layer then responds
to the channel mean as the pre-trained one responded to a CT, and every other encoder tensor loads unchanged.
"""

from __future__ import annotations

import logging
import os

import torch
from monai.networks.utils import copy_model_state

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "swinViT."  # SwinUNETR's attribute holding the Swin transformer
PATCH_EMBEDDING = "swinViT.patch_embed.proj.weight"
FILE_PREFIX = "module."  # key prefix of the released (DataParallel-saved) model_swinvit.pt
# The released file names the block MLP layers as timm does; MONAI's MLPBlock calls them linear1/linear2.
_RENAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))


def file_key(network_key: str) -> str:
    """Key in a `model_swinvit.pt` state_dict of the SwinUNETR state_dict entry `network_key` (`swinViT.*`)."""
    key = FILE_PREFIX + network_key[len(ENCODER_PREFIX) :]
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return key


def adapt_patch_embedding(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A single-channel patch-embedding kernel `(F, 1, *k)` spread over `in_channels` inputs, `(F, C, *k)`."""
    return weight.repeat(1, in_channels, *([1] * (weight.ndim - 2))) / in_channels


def load_encoder(network: torch.nn.Module, path: str) -> int:
    """Copies every encoder tensor of `network` (a SwinUNETR) from the file at `path`; returns how many.

    Raises FileNotFoundError / ValueError naming `path` when the file is missing, is not an encoder file, or was
    made for a different network (feature_size, depths, in_channels), leaving `network` unchanged.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained_path {path!r} does not exist (set use_pretrained=false to train from scratch)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or f"{FILE_PREFIX}patch_embed.proj.weight" not in weights:
        raise ValueError(
            f"pretrained_path {path!r} is not a Swin UNETR encoder file: expected a state_dict with "
            f"'{FILE_PREFIX}patch_embed.proj.weight' (the layout of model_swinvit.pt)."
        )
    params = {n for n, _ in network.named_parameters()}
    source: dict[str, torch.Tensor] = {}
    for name, target in network.state_dict().items():
        if not name.startswith(ENCODER_PREFIX):
            continue
        key = file_key(name)
        if key not in weights:
            if name in params:  # buffers (e.g. relative_position_index) are derived from the architecture
                raise ValueError(
                    f"pretrained_path {path!r} lacks encoder tensor {key!r}; it does not match the network."
                )
            continue
        weight = weights[key]
        if (
            name == PATCH_EMBEDDING
            and weight.shape[1] == 1
            and target.shape[1] > 1
            and weight.shape[2:] == target.shape[2:]
        ):
            logger.info(f"patch embedding adapted from 1 to {target.shape[1]} input channels (kernel / channels)")
            weight = adapt_patch_embedding(weight, target.shape[1])
        if weight.shape != target.shape:
            raise ValueError(
                f"pretrained_path {path!r} does not match the network: {key!r} is {tuple(weight.shape)} in the "
                f"file but {tuple(target.shape)} in the network (check feature_size and in_channels)."
            )
        source[name] = weight
    _, loaded, _ = copy_model_state(network, source, inplace=True)
    num_encoder = sum(1 for n in network.state_dict() if n.startswith(ENCODER_PREFIX))
    logger.info(f"loaded {len(loaded)} of {num_encoder} encoder tensors from {path}")
    return len(loaded)
