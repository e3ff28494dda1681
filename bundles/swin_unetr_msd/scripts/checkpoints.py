"""Finding the checkpoint to resume from: MONAI's CheckpointSaver numbers its interval files by epoch or
iteration (`checkpoint_epoch=N.pt`, `checkpoint_iteration=N.pt`), so the newest has the largest N."""

from __future__ import annotations

import glob
import os
import re

_NUMBERED = re.compile(r"checkpoint_(?:epoch|iteration)=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> str:
    """Path of the interval checkpoint with the largest number in `ckpt_dir`; a clear error when there is none."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "*checkpoint_*=*.pt"))
             if (m := _NUMBERED.search(p))]  # fmt: skip
    if not found:
        raise FileNotFoundError(
            f"resume=true but ckpt_dir {ckpt_dir!r} holds no 'checkpoint_epoch=N.pt' or 'checkpoint_iteration=N.pt' "
            "to resume from; train without resume first, or point ckpt_dir at the earlier run."
        )
    return max(found)[1]
