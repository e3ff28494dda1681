"""Packages a bundle as the Model Zoo distributes it: `<name>_v<version>.zip`, the bundle folder at the archive root.

Only the bundle's own files go in: configs, scripts, docs, LICENSE, large_files.yml and models/README.md. Weights
(they come through large_files.yml), data, logs, evaluation output and caches are left out. The zip is written
under a temporary name and renamed, so a failed run leaves no partial archive.

    python ci/package_bundle.py bundles/swin_unetr_btcv --out_dir dist
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import zipfile

EXCLUDED_DIRS = {"eval", "runs", "logs", "mlruns", "__pycache__", ".pytest_cache", "data"}
EXCLUDED_FILES = [
    "*.pt", "*.ts", "*.onnx", "*.pth", "*.ckpt",  # weights: large_files.yml fetches them
    "*.nii", "*.nii.gz", "*.dcm", "*.npy", "*.npz",  # images
    "events.out.tfevents.*", "*.log", "*.csv", "*.pyc", ".partial-*", ".DS_Store",
]  # fmt: skip


def bundle_files(bundle_dir: str) -> list[str]:
    """Paths relative to `bundle_dir` that belong in the archive, sorted."""
    found = []
    for folder, dirs, files in os.walk(bundle_dir):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in files:
            if not any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED_FILES):
                found.append(os.path.relpath(os.path.join(folder, name), bundle_dir))
    return sorted(found)


def package(bundle_dir: str, out_dir: str) -> str:
    """Writes `out_dir/<name>_v<version>.zip` for the bundle at `bundle_dir`; returns its path."""
    bundle_dir = os.path.abspath(bundle_dir)
    meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{bundle_dir!r} is not a bundle: it has no configs/metadata.json.")
    with open(meta_file) as f:
        version = json.load(f)["version"]
    name = os.path.basename(bundle_dir)
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"{name}_v{version}.zip")
    partial = os.path.join(out_dir, f".partial-{os.getpid()}-{name}.zip")
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for rel in bundle_files(bundle_dir):
                archive.write(os.path.join(bundle_dir, rel), f"{name}/{rel}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle_dir")
    parser.add_argument("--out_dir", default="dist")
    print(package(**vars(parser.parse_args())))
