# Copied from common_scripts/error_summary.py by ci/sync_scripts.py: edit that file, then run the script.
"""The bundle's own message as the last line of a failed run.

MONAI wraps an error raised while it builds or runs a component in one of its own ("Failed to instantiate ...",
"Failed to evaluate ...", "applying transform ..."), so the last line a user reads names MONAI's plumbing while the
message that names the file or setting at fault sits 30-40 lines above it. `install` keeps Python's traceback and
repeats that message as the last line.
"""

from __future__ import annotations

import sys
from types import TracebackType

_MONAI_WRAPPERS = ("Failed to instantiate", "Failed to evaluate", "applying transform", "Component to instantiate")


def root_error(error: BaseException) -> BaseException:
    """The outermost exception in `error`'s chain that is not one of MONAI's wrappers (`error` if all are).

    Args:
        error: the exception that ended the run.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not str(current).startswith(_MONAI_WRAPPERS):
            return current
        current = current.__cause__ or current.__context__
    return error


def install() -> None:
    """Makes the interpreter print, after the usual traceback, the message of the error behind MONAI's wrappers."""
    previous = sys.excepthook
    if getattr(previous, "repeats_root_error", False):
        return

    def print_root_error_last(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        previous(kind, error, trace)
        root = root_error(error)
        if root is not error:
            message = " ".join(str(root).split())
            print(f"{type(root).__name__}: {message}", file=sys.stderr)

    print_root_error_last.repeats_root_error = True  # type: ignore[attr-defined]
    sys.excepthook = print_root_error_last
