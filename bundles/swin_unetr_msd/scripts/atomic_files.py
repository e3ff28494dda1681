# Copied from common_scripts/atomic_files.py by ci/sync_scripts.py: edit that file, then run the script.
"""Files that appear complete or not at all.

A file is written beside its final name as `.partial-<pid>-<name>`, flushed to disk and renamed into place (one
atomic step on a POSIX file system), so a run killed at any moment leaves either the previous file or the new one.
What a kill leaves behind is a partial file of a process that no longer runs; `remove_stale_partials` deletes those.
MONAI's writers and ignite's `DiskSaver` either write to the final name or use anonymous temporary names that a
later run cannot tell apart from the user's own files, hence this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator

PARTIAL_PREFIX = ".partial-"
_PARTIAL = re.compile(r"^\.partial-(\d+)-")
logger = logging.getLogger(__name__)


def partial_path(path: str) -> str:
    """The temporary name `path` is written under before it is renamed into place."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f"{PARTIAL_PREFIX}{os.getpid()}-{name}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write `path`'s content to; on success it is synced and renamed to `path`.

    On an error the temporary file is removed and `path` keeps whatever it held before.

    Args:
        path: the final file name.
    """
    partial = partial_path(path)
    try:
        yield partial
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(folder: str) -> list[str]:
    """Removes the partial files (or folders) in `folder` left by processes that no longer run.

    Args:
        folder: the folder to clean; a folder that does not exist is left alone.

    Returns:
        the paths removed.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _PARTIAL.match(name)
        if match is None or _process_runs(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
        logger.warning(f"removed {path}, a partial file left by an interrupted run")
    return removed
