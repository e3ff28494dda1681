"""Finding the checkpoint to resume from; MONAI's CheckpointSaver numbers its interval files by epoch."""

from __future__ import annotations

import glob
import os
import re

_EPOCH = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> str:
    """Path of the `*checkpoint_epoch=N.pt` with the largest N in `ckpt_dir`; a clear error when there is none."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "*checkpoint_epoch=*.pt"))
             if (m := _EPOCH.search(p))]  # fmt: skip
    if not found:
        raise FileNotFoundError(
            f"resume=true but ckpt_dir {ckpt_dir!r} holds no 'checkpoint_epoch=N.pt' to resume from; "
            "train without resume first, or point ckpt_dir at the earlier run."
        )
    return max(found)[1]
