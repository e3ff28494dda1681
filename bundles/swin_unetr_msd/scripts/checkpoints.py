# Copied from common_scripts/checkpoints.py by ci/sync_scripts.py: edit that file, then run the script.
"""Checkpoints that are never lost, and a resume that continues exactly.

MONAI's `CheckpointSaver` writes straight to the final name, and ignite's `Checkpoint` removes the predecessor
before its successor exists, so a kill during a save leaves nothing loadable. `SafeCheckpointSaver` keeps MONAI's
saver and ignite's bookkeeping but writes through `atomic_files` and removes a predecessor only after its successor
is complete. `RandomStates` puts every random generator a training run draws from into the checkpoint, so the
resumed run draws what the uninterrupted one would have. `latest_checkpoint` picks the newest checkpoint that loads,
`check_ckpt_dir` keeps a run from replacing weights it did not write, and `CheckedCheckpointLoader` names the file
when weights cannot be read.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.transforms import Randomizable

from .atomic_files import atomic_path, remove_stale_partials

_NUMBERED = re.compile(r"checkpoint_(?:epoch|iteration)=(\d+)\.pt$")
WEIGHT_FILES = ("model.pt", "model_swinvit.pt")
logger = logging.getLogger(__name__)


def numbered_checkpoints(ckpt_dir: str) -> list[str]:
    """The interval checkpoints (`checkpoint_epoch=N.pt`, `checkpoint_iteration=N.pt`) in `ckpt_dir`, newest first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(ckpt_dir, "*checkpoint_*=*.pt"))
             if (m := _NUMBERED.search(p))]  # fmt: skip
    return [path for _, path in sorted(found, reverse=True)]


def _readable(path: str) -> Exception | None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure means this file cannot be resumed from
        return error
    return None


def latest_checkpoint(ckpt_dir: str) -> str:
    """Path of the newest interval checkpoint in `ckpt_dir` that loads; unreadable newer ones are named and skipped.

    Args:
        ckpt_dir: the folder a training run saved its checkpoints to.
    """
    skipped = []
    for path in numbered_checkpoints(ckpt_dir):
        error = _readable(path)
        if error is None:
            return path
        skipped.append(path)
        logger.warning(f"skipping checkpoint {path}: it cannot be read ({type(error).__name__}: {error})")
    if skipped:
        raise ValueError(f"resume=true but no checkpoint in ckpt_dir {ckpt_dir!r} can be read: {skipped}")
    raise FileNotFoundError(
        f"resume=true but ckpt_dir {ckpt_dir!r} holds no 'checkpoint_epoch=N.pt' or 'checkpoint_iteration=N.pt' "
        "to resume from; train without resume first, or point ckpt_dir at the earlier run."
    )


def check_ckpt_dir(ckpt_dir: str, resume: bool, overwrite_weights: bool, handlers: Sequence[Any] = ()) -> None:
    """Refuses to start a fresh run in a `ckpt_dir` that holds weights or checkpoints of another run.

    Training writes `model.pt` at its first validation; that is also where `download_large_files` installs the
    published weights, so a fresh run would replace them without a word. A run that starts from those weights
    (a `CheckpointLoader` among its `handlers` loads them, as MONAI Label's training does) continues them and may
    replace them.

    Args:
        ckpt_dir: the folder the run writes its weights and checkpoints to.
        resume: the run continues the one whose checkpoints are in `ckpt_dir`.
        overwrite_weights: the user asked to replace what `ckpt_dir` holds.
        handlers: the trainer's handlers.
    """
    if resume or overwrite_weights or not os.path.isdir(ckpt_dir):
        return
    held = [os.path.join(ckpt_dir, name) for name in WEIGHT_FILES if os.path.exists(os.path.join(ckpt_dir, name))]
    starting_points = {os.path.abspath(h.load_path) for h in handlers if isinstance(h, CheckpointLoader)}
    continued = [path for path in held if os.path.abspath(path) in starting_points]
    if continued:
        logger.info(f"this run starts from {continued} and will replace them with its own best weights")
        return
    held += numbered_checkpoints(ckpt_dir)
    if held:
        raise FileExistsError(
            f"ckpt_dir {ckpt_dir!r} already holds {[os.path.basename(p) for p in held]}, which this run would "
            "replace; continue that run with --resume True, choose another --ckpt_dir, "
            "or pass --overwrite_weights True to replace them."
        )


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver that writes through `atomic_path` and removes a file only after the next save succeeded."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename  # MONAI's fixed file name (e.g. model.pt), or None for ignite's numbered names
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        if idist.get_rank() != self.save_on_rank:
            return
        for old in self.pending_removal:
            if old != filename and os.path.exists(os.path.join(self.dirname, old)):
                os.remove(os.path.join(self.dirname, old))
        self.pending_removal = []

    def _save_func(self, checkpoint: Mapping, path: Any, func: Any) -> None:
        with atomic_path(os.fspath(path)) as partial:
            func(checkpoint, partial, **self.kwargs)

    def remove(self, filename: str) -> None:
        self.pending_removal.append(self.filename or filename)


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's `CheckpointSaver` whose files appear complete or not at all, predecessors removed after successors.

    It also takes over the interval checkpoints an interrupted run left in `save_dir` (they are removed once this
    run has saved its own), and its best-score tracking is a checkpointable state (`state_dict`/`load_state_dict`),
    so a resumed run replaces the best model only with a better one.

    Args:
        save_dir: the folder to save to.
        save_dict: the objects to save, as for `CheckpointSaver`.
        engine_key: also save the state of the engine the saver is attached to, under this key (the engine cannot
            be in `save_dict` when the saver is one of its own handlers).
        kwargs: the other arguments of `CheckpointSaver`.
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, dict(save_dict), **kwargs)
        self.engine_key = engine_key
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(save_dir, checkpoint.save_handler.filename)
        if idist.get_rank() == 0:
            remove_stale_partials(save_dir)
        if self._interval_checkpoint is not None:  # earlier files rank below anything this run saves
            earlier = reversed(numbered_checkpoints(save_dir))
            self._interval_checkpoint._saved = [Checkpoint.Item(-1, os.path.basename(p)) for p in earlier]

    def attach(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.save_dict[self.engine_key] = engine  # the dict ignite's checkpoints save
        super().attach(engine)

    def state_dict(self) -> dict[str, Any]:
        """The best-score tracking of the key-metric checkpoint (empty when the saver keeps none)."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's `CheckpointLoader` whose error names the file when it cannot be read or does not fit the network.

    Args:
        load_path: the checkpoint file.
        load_dict: the objects to load, as for `CheckpointLoader`.
        engine_key: also restore the engine it is attached to from this key (to resume a training run: the engine
            cannot be in `load_dict` when the loader is one of its own handlers).
        kwargs: the other arguments of `CheckpointLoader`.
    """

    def __init__(self, load_path: str, load_dict: dict, engine_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(load_path, dict(load_dict), **kwargs)
        self.engine_key = engine_key

    def __call__(self, engine: Engine) -> None:
        if self.engine_key is not None:
            self.load_dict[self.engine_key] = engine
        try:
            super().__call__(engine)
        except Exception as error:
            raise ValueError(
                f"cannot load weights from {self.load_path} ({type(error).__name__}: {str(error)[:300]}); "
                "the file may be empty, truncated or saved from a network with other settings."
            ) from error
        if self.engine_key is not None:
            logger.info(f"resuming from {self.load_path} after epoch {engine.state.epoch}, "
                        f"iteration {engine.state.iteration}")  # fmt: skip


def _random_transforms(transform: Any, seen: set[int] | None = None) -> Iterator[Randomizable]:
    """Every object with its own random generator in a (nested) MONAI transform, inner helpers included."""
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return
    seen.add(id(transform))
    if isinstance(transform, Randomizable):
        yield transform
    for value in getattr(transform, "__dict__", {}).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Randomizable) or hasattr(item, "transforms"):
                yield from _random_transforms(item, seen)


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached), "name": name}  # fmt: skip


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]


class RandomStates:
    """The random generators a training run draws from, as one checkpointable object.

    Torch (CPU and every CUDA device), NumPy's and Python's global generators, and the own generator of every
    random transform in `transforms` (used when the data loader has no workers; with workers, each epoch's
    workers are seeded from torch's generator). The states are saved as tensors and numbers, which `weights_only`
    loading accepts.

    Args:
        transforms: the training transforms (a MONAI `Compose`), or None.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = list(_random_transforms(transforms)) if transforms is not None else []

    def state_dict(self) -> dict[str, Any]:
        version, python_keys, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": {"version": version, "keys": torch.tensor(python_keys, dtype=torch.int64), "gauss": gauss},
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        np.random.set_state(_numpy_tuple(state_dict["numpy"]))
        python = state_dict["python"]
        random.setstate((python["version"], tuple(python["keys"].tolist()), python["gauss"]))
        if len(state_dict["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the random states of {len(state_dict['transforms'])} transforms, the training "
                f"transforms have {len(self.transforms)}; resume with the settings of the interrupted run."
            )
        for transform, state in zip(self.transforms, state_dict["transforms"]):
            transform.R.set_state(_numpy_tuple(state))
