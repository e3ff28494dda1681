"""Shared fixtures: synthetic CT data, tiny bundle settings and a runner for `python -m monai.bundle`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # One pytest-xdist worker per core: each worker's in-process tests and bundle runs share the cores evenly
    # instead of every process starting one thread per core.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
sys.path.insert(0, str(REPO / "ci"))

import synthetic_ct  # noqa: E402
from bundle_launcher import BundleLauncher, StartedRun, start_process  # noqa: E402

# Small enough for 2 CPU cores: SwinUNETR needs sides divisible by 32, and 32^3 leaves a 1^3 bottleneck that
# instance norm cannot normalise, so 64^3 is the smallest usable patch.
TINY = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "num_samples": 1,
    "num_workers": 0,
    "use_checkpoint": False,
    "warmup_epochs": 1,
    "sw_batch_size": 2,
}
SMALL_SHAPE = (120, 110, 36)  # voxels at 0.8 x 0.8 x 2.5 mm: about 64 x 59 x 45 after resampling


def overrides_to_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if isinstance(value, str) else str(value).replace(" ", "")]
    return args


_launcher: BundleLauncher | None = None


def _bundle_env() -> dict[str, str]:
    """The environment of a bundle run: this one, without what an in-process test's huge-pages setting added."""
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def _forking_launcher() -> BundleLauncher | None:
    """The suite's `BundleLauncher`, started at first use; None where CUDA is present (a fork is unsafe there)."""
    global _launcher
    import torch

    if _launcher is None and not torch.cuda.is_available():
        _launcher = BundleLauncher(_bundle_env(), str(REPO))
    return _launcher


# The longest modules first (measured with --durations): pytest-xdist hands whole files to the workers in
# collection order (--dist loadfile), so the long ones start at once and the short ones fill in at the end, instead
# of one worker finishing a long file alone while the other core idles.
LONGEST_FIRST = (
    "test_btcv_bundle.py",
    "test_btcv_scripts.py",
    "test_pretrain_bundle.py",
    "test_inference_equivalence.py",
    "test_msd_bundle.py",
    "test_ssl_experiment.py",
    "test_nothing_lost.py",
    "test_watching_runs.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def pytest_sessionfinish(session, exitstatus):
    if _launcher is not None:
        _launcher.close()


def run_bundle(
    configs: Sequence[str | Path],
    run_id: str | None = None,
    torchrun: int = 0,
    check: bool = True,
    rank_logs: Path | None = None,
    **overrides,
) -> subprocess.CompletedProcess:
    """Runs `python -m monai.bundle run` (or under `torchrun`) as a user would; returns the finished process.

    Without `torchrun` and CUDA the run is a fork of a process with torch and MONAI imported (`bundle_launcher`).
    With `rank_logs` (and `torchrun`) each rank's output goes to files there instead.
    """
    files = [str(c) for c in configs]
    config_arg = files[0] if len(files) == 1 else str(files)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    if rank_logs is not None:  # torchrun writes each rank's output to rank_logs/<run>/attempt_0/<rank>/std*.log
        launcher += [f"--log-dir={rank_logs}", "--redirects=3"]
    args = ["run"] + ([run_id] if run_id else []) + ["--config_file", config_arg] + overrides_to_args(overrides)
    cmd = launcher + ["-m", "monai.bundle"] + args
    # a hung run must fail the test, not stall the suite
    if torchrun:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_bundle_env(), cwd=REPO, timeout=600)
    else:
        proc = run_bundle_args(args)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def start_bundle_args(args: Sequence[str], cwd: str | Path = REPO) -> StartedRun:
    """Starts `python -m monai.bundle ARGS` in `cwd` (forked as in `run_bundle` where possible); returns it running."""
    forking = _forking_launcher()
    if forking is not None:
        return forking.start(list(args), env=_bundle_env(), cwd=str(cwd))
    return start_process(list(args), env=_bundle_env(), cwd=str(cwd))


def run_bundle_args(args: Sequence[str], cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` in `cwd` (forked as in `run_bundle` where possible); returns the finished run."""
    return start_bundle_args(args, cwd).wait(timeout=600)


def verify_bundle_metadata(meta_file: Path, tmp_path: Path) -> None:
    """`monai.bundle.verify_metadata` against the schema in ../shared, else the downloaded one; skips only when
    neither can be had (no local copy and no network)."""
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    if SCHEMA.is_file():
        shutil.copy(SCHEMA, schema)
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except Exception as e:
        if not SCHEMA.is_file() and not schema.is_file():
            pytest.skip(f"no schema at {SCHEMA} and the schema URL cannot be downloaded here: {e}")
        raise


def read_back_dicom_seg(path, series_folder):
    """The DICOM SEG at `path` read back against its source series: (segment labels, label map per source file in
    InstanceNumber order, the SEG dataset, the sources). Checks the references and each frame's geometry."""
    import highdicom as hd
    from pydicom import dcmread

    seg = hd.seg.segread(str(path))
    sources = sorted((dcmread(str(f)) for f in series_folder.iterdir()), key=lambda d: int(d.InstanceNumber))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientName == sources[0].PatientName
    by_uid = {d.SOPInstanceUID: d for d in sources}
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in sources[0].PixelSpacing]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(sources[0].ImageOrientationPatient)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame sits where the image it segments is
        source = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in source.ImagePositionPatient])
    names = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    numbers = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in sources], combine_segments=True, skip_overlap_checks=True
    )
    return names, numbers, seg, sources


def write_encoder_file(network, path) -> None:
    """Saves `network`'s encoder as the pre-training bundle exports it (model_swinvit.pt layout); loaded by file path
    so the `scripts` package of whichever bundle is imported stays untouched."""
    spec = importlib.util.spec_from_file_location(
        "pretrain_encoder_export", BUNDLES / "swin_unetr_pretrain" / "scripts" / "encoder_export.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    torch.save(module.EncoderCheckpoint(network).state_dict(), path)


def load_bundle_scripts(bundle: str):
    """Imports a bundle's `scripts` package fresh (each bundle has its own package of that name)."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(BUNDLES / bundle))
    try:
        return importlib.import_module("scripts")
    finally:
        sys.path.remove(str(BUNDLES / bundle))


@pytest.fixture(scope="session")
def btcv_data(tmp_path_factory) -> Path:
    """Five labelled cases (four train, one validation by default) and one test case in the BTCV layout."""
    out = tmp_path_factory.mktemp("btcv")
    return Path(synthetic_ct.generate(str(out), layout="btcv", num_train=5, num_test=1, shape=SMALL_SHAPE, seed=1))
