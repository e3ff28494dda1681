"""Copies the shared helper modules from `common_scripts/` into the bundles that use them.

Each bundle must work when copied alone out of this repository (the Model Zoo and MONAI Label take a bundle folder),
so a helper used by several bundles lives in each bundle's `scripts/`. `common_scripts/` holds the one copy to edit;
this script writes the bundles' copies, each under a first line naming its source. `--check` changes nothing and
exits 1 naming every copy that differs (the test suite runs it).

    python ci/sync_scripts.py           # after editing common_scripts/
    python ci/sync_scripts.py --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "common_scripts"
ALL = ("swin_unetr_btcv", "swin_unetr_msd", "swin_unetr_pretrain")
SEGMENTATION = ("swin_unetr_btcv", "swin_unetr_msd")
# module -> the bundles that carry a copy
COPIES: dict[str, tuple[str, ...]] = {
    "atomic_files.py": ALL,
    "checkpoints.py": ALL,
    "checks.py": ALL,
    "curves.py": ALL,
    "error_summary.py": ALL,
    "finite_loss.py": ALL,
    "memory.py": ALL,
    "mixed_precision.py": ALL,
    "progress.py": ALL,
    "tracking.py": ALL,
    "window_attention.py": ALL,
    "cpu_network.py": SEGMENTATION,
    "openvino_engine.py": SEGMENTATION,
    "mirroring.py": SEGMENTATION,
    "ensemble.py": SEGMENTATION,
    "datalist.py": SEGMENTATION,
    "dicom_seg.py": SEGMENTATION,
    "fast_norm.py": SEGMENTATION,
    "fused_input_block.py": SEGMENTATION,
    "fused_upsampling.py": SEGMENTATION,
    "image_writer.py": SEGMENTATION,
    "labels.py": SEGMENTATION,
    "metrics.py": SEGMENTATION,
    "overlays.py": SEGMENTATION,
    "patchwise.py": SEGMENTATION,
    "pretrained.py": SEGMENTATION,
    "winograd_conv.py": SEGMENTATION,
}


def expected_copy(module: str) -> str:
    """The text of a bundle's copy of `module`: the source under a line that says where to edit it."""
    header = f"# Copied from common_scripts/{module} by ci/sync_scripts.py: edit that file, then run the script.\n"
    return header + (SOURCE / module).read_text()


def stale_copies() -> list[Path]:
    """The bundle copies that are missing or differ from `expected_copy`."""
    stale = []
    for module, bundles in COPIES.items():
        text = expected_copy(module)
        for bundle in bundles:
            path = REPO / "bundles" / bundle / "scripts" / module
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a copy differs")
    args = parser.parse_args()
    unknown = sorted(p.name for p in SOURCE.glob("*.py") if p.name not in COPIES)
    if unknown:
        print(f"common_scripts/ holds modules that COPIES in {__file__} does not list: {unknown}", file=sys.stderr)
        return 1
    stale = stale_copies()
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} differs from common_scripts/{path.name}; run python ci/sync_scripts.py")
        return 1 if stale else 0
    for path in stale:
        path.write_text(expected_copy(path.name))
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
