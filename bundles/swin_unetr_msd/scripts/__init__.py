"""Components of the MSD bundle that MONAI does not provide.

The configs name them as `"_target_": "scripts.<module>.<name>"`, located lazily: MONAI puts the bundle folder
on `sys.path` only when the workflow runs, so a top-level `$import scripts` would fail when the bundle is run
from another folder.
"""

import os


def bundle_root() -> str:
    """Absolute path of this bundle's folder (the default `bundle_root`, so any working directory works)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
