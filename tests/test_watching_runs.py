"""Watching runs: MLflow tracking, progress on a terminal (quiet elsewhere), and the pictures fine-tuning writes (the
pre-training pictures and tracking: test_pretrain_bundle.py, on its run)."""

import fcntl
import json
import os
import shutil
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES, REPO, TINY, overrides_to_args, run_bundle
from PIL import Image

BTCV = BUNDLES / "swin_unetr_btcv" / "configs"


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def tracked_run(btcv_data, tmp_path_factory):
    """Two epochs of tiny BTCV training with `--tracking mlflow`, as a user runs a downloaded bundle in a shell: a
    copy of the bundle, started from another folder on a terminal, with the default `output_dir` and `ckpt_dir`
    (inside the copy). Returns the copy's folder, which holds what the run printed in `run.log`."""
    out = tmp_path_factory.mktemp("tracked")
    bundle = out / "swin_unetr_btcv"
    shutil.copytree(BTCV.parent, bundle, ignore=shutil.ignore_patterns("eval", "*.pt", "__pycache__"))
    elsewhere = out / "elsewhere"
    elsewhere.mkdir()
    args = ["run", "training", "--config_file", str(bundle / "configs" / "train.json"), "--tracking", "mlflow"]
    args += overrides_to_args(dict(dataset_dir=str(btcv_data), max_epochs=2, val_interval=1, **TINY))
    (bundle / "run.log").write_text(run_on_terminal([sys.executable, "-m", "monai.bundle"] + args, cwd=elsewhere))
    return bundle


def test_mlflow_records_settings_losses_metrics_config_and_pictures(tracked_run):
    """A tracked run can be reproduced from the store: every public setting is a param (as the run resolved it),
    the merged config and the training curves are artifacts, the loss is logged per iteration and the validation
    Dice per epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'eval' / 'mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params = run.data.params
    assert int(params["max_epochs"]) == 2
    assert params["learning_rate"] == "0.0001" and params["feature_size"] == "12" and params["seed"] == "0"
    assert params["roi_size"] == "[64, 64, 64]" and params["num_samples"] == "1"
    assert params["output_dir"] == str(tracked_run / "eval") and params["use_pretrained"] == "False"
    assert params["pretrained_path"].endswith("/../swin_unetr_pretrain/models/model_swinvit.pt")
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 8  # 4 cases x 2 epochs
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert len(dice) == 2 and all(0.0 <= m.value <= 1.0 for m in dice)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    (config_name,) = [name for name in artifacts if name.startswith("config_") and name.endswith(".json")]
    assert artifacts == {config_name, "training_curves.png"}
    config = json.loads(Path(client.download_artifacts(run.info.run_id, config_name)).read_text())
    assert config["feature_size"] == 12 and config["max_epochs"] == 2 and config["dataset_dir"] == params["dataset_dir"]
    assert os.listdir(tracked_run.parent / "elsewhere") == []  # nothing written where it started


def test_training_writes_a_curve_plot(tracked_run):
    assert png_size(tracked_run / "eval" / "training_curves.png") == (800, 450)


def test_evaluation_writes_one_overlay_picture_per_case_and_tracks_them(tracked_run, btcv_data):
    """Evaluation's pictures (and with `save_predictions` its label maps), also logged to MLflow with the merged
    config when `--output_dir` is plain text (MONAI's own config copy logged the text `"<dir> + '/config_...json'"`
    as its path)."""
    from mlflow.tracking import MlflowClient

    out = tracked_run / "evaluation"
    proc = run_bundle(
        [BTCV / "train.json", BTCV / "evaluate.json"], tracking="mlflow", dataset_dir=str(btcv_data),
        ckpt_dir=str(tracked_run / "models"), output_dir=str(out), val_fraction=0.4, save_predictions=True, **TINY,
    )  # fmt: skip
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == ["img0004.png", "img0005.png"]
    for case in ("0004", "0005"):  # with save_predictions, label maps in each case's original geometry
        predicted = nib.load(out / "predictions" / f"img{case}_seg.nii.gz")
        truth = nib.load(btcv_data / "labelsTr" / f"label{case}.nii.gz")
        assert predicted.shape == truth.shape and predicted.get_data_dtype() == np.uint8
        np.testing.assert_allclose(predicted.affine, truth.affine, atol=1e-4)
        assert np.asarray(predicted.dataobj).max() <= 13
    assert png_size(out / "pictures" / "img0004.png") == (990, 675)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["output_dir"] == str(out) and run.data.params["val_fraction"] == "0.4"
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id))  # MONAI logs a folder's files flat
    assert len(logged) == 3 and logged[0].startswith("config_") and logged[1:] == ["img0004.png", "img0005.png"]
    assert not re.search(r"validation: +\d+%\|", proc.stdout + proc.stderr)  # output piped: no progress bar


def run_on_terminal(cmd, cwd=REPO, timeout=600) -> str:
    """Runs `cmd` in `cwd` with stdout and stderr on a pseudo-terminal, as in an interactive shell; returns what it
    printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new pty is 0 columns wide
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks)[-3000:].decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(tracked_run):
    """On a terminal, one bar over the whole run, with the time left, the epoch and the loss, and one while
    validation runs; a log line never shares a terminal line with a bar. (Piped output has none: the evaluation
    above and `test_btcv_bundle.py`'s training.)"""
    terminal = (tracked_run / "run.log").read_text()
    assert re.search(r"training: +100%\|[^\r\n]*\| 8/8 \[\d\d:\d\d<00:00, [^\]]*epoch=2/2, loss=\d", terminal)
    assert re.search(r"training: +\d+%\|[^\r\n]*\| 1/8 \[\d\d:\d\d<\d\d:\d\d,", terminal)  # a time left at once
    assert re.search(r"validation: +\d+%\|", terminal)
    segments = re.split(r"[\r\n]", terminal)
    assert any(" - INFO - " in segment for segment in segments)
    assert not [segment for segment in segments if " - INFO - " in segment and "%|" in segment]
