"""Saving the pre-trained encoder in the layout of the released `model_swinvit.pt`.

That layout is `{"state_dict": {"module.patch_embed.proj.weight": ..., "module.layers1.0.blocks.0.mlp.fc1.weight":
...}}`, which `SwinUNETR.load_from` and the fine-tuning bundles read. `EncoderCheckpoint` lets MONAI's
`CheckpointSaver` write it (atomically, on rank 0, on each new best validation score) like any other checkpoint.
"""

from __future__ import annotations

import torch

ENCODER_PREFIX = "swinViT."  # attribute of the Swin transformer in SSLHead and SwinUNETR alike
FILE_PREFIX = "module."  # the released file was saved from a DataParallel model
# The released file names the block MLP layers as timm does; MONAI's MLPBlock calls them linear1/linear2.
_RENAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))


def file_key(network_key: str) -> str:
    """Key in a `model_swinvit.pt` state_dict of the network state_dict entry `network_key` (`swinViT.*`)."""
    key = FILE_PREFIX + network_key[len(ENCODER_PREFIX) :]
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return key


def encoder_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder entries of a network's state_dict, keyed as in `model_swinvit.pt`."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    return {file_key(k): v.detach().cpu() for k, v in network.state_dict().items() if k.startswith(ENCODER_PREFIX)}


class EncoderCheckpoint:
    """A stand-in for the network whose `state_dict()` is the `model_swinvit.pt` content of its encoder."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"state_dict": encoder_state(self.network)}
