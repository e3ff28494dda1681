"""Nothing lost, every bad input named: atomic writes, checkpoints that survive a kill, exact resume, content checks.

The components are tested on the BTCV bundle's copies (the helpers are identical in all three bundles, see
`test_bundle_conventions`); the chaos test kills a tiny BTCV training with SIGKILL and resumes it.
"""

import logging
import os
import re
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    BUNDLES,
    TINY,
    load_bundle_scripts,
    overrides_to_args,
    run_bundle,
    start_bundle_args,
    synthetic_ct,
)
from ignite.engine import Engine
from monai.transforms import Compose, RandFlipd, RandSpatialCropSamplesd

scripts = load_bundle_scripts("swin_unetr_btcv")
from scripts import atomic_files, checkpoints, datalist, error_summary, image_writer  # noqa: E402

TRAIN = BUNDLES / "swin_unetr_btcv" / "configs" / "train.json"
INFERENCE = BUNDLES / "swin_unetr_btcv" / "configs" / "inference.json"


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def engine_at(epoch: int, metric: float | None = None) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = epoch, epoch * 10
    if metric is not None:
        engine.state.metrics = {"dice": metric}
    return engine


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- atomic files -----------------------------------------------------------------------------------------------
def test_atomic_path_keeps_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_files.atomic_path(str(target)) as partial:
            with open(partial, "wb") as f:
                f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.pt"]
    with atomic_files.atomic_path(str(target)) as partial:
        with open(partial, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["model.pt"]


def test_stale_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    stale = tmp_path / f".partial-{dead_pid()}-case_seg.nii.gz"
    live = tmp_path / f".partial-{os.getpid()}-other_seg.nii.gz"
    for path in (stale, live, tmp_path / "case_seg.nii.gz"):
        path.write_bytes(b"x")
    assert atomic_files.remove_stale_partials(str(tmp_path)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "case_seg.nii.gz"])


def test_nifti_writer_leaves_the_final_file_only_and_logs_its_name(tmp_path, caplog):
    writer = image_writer.AtomicNibabelWriter()
    writer.set_data_array(np.zeros((1, 4, 4, 4), np.uint8), channel_dim=0)
    writer.set_metadata({"affine": np.eye(4)})
    with caplog.at_level(logging.INFO):
        writer.write(str(tmp_path / "case_seg.nii.gz"), verbose=True)
    assert os.listdir(tmp_path) == ["case_seg.nii.gz"]
    assert nib.load(tmp_path / "case_seg.nii.gz").shape == (4, 4, 4)
    assert f"written: {tmp_path / 'case_seg.nii.gz'}" in caplog.text and ".partial-" not in caplog.text


# --- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_predecessor_survives_a_failed_save_and_goes_after_a_good_one(tmp_path, monkeypatch):
    network = torch.nn.Linear(2, 2)
    state = {"model": network, "optimizer": torch.optim.SGD(network.parameters(), lr=0.1)}
    saver = checkpoints.SafeCheckpointSaver(str(tmp_path), state, save_interval=1, n_saved=1)
    saver.interval_completed(engine_at(1))
    assert os.listdir(tmp_path) == ["checkpoint_epoch=1.pt"]
    real_save = torch.save

    def save_then_die(obj, f, **kwargs):
        assert (tmp_path / "checkpoint_epoch=1.pt").is_file()  # the predecessor still exists during the write
        with open(f, "wb") as out:
            out.write(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        saver.interval_completed(engine_at(2))
    assert os.listdir(tmp_path) == ["checkpoint_epoch=1.pt"]
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True).keys() == {"model", "optimizer"}

    saver = checkpoints.SafeCheckpointSaver(str(tmp_path), state, save_interval=1, n_saved=1)
    monkeypatch.setattr(torch, "save", real_save)
    saver.interval_completed(engine_at(2))  # a new run (e.g. resumed) takes over the earlier file and removes it
    assert os.listdir(tmp_path) == ["checkpoint_epoch=2.pt"]


def test_best_model_tracking_is_restored_so_a_worse_score_keeps_the_best_model(tmp_path):
    network = torch.nn.Linear(2, 2)
    settings = dict(save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt")
    saver = checkpoints.SafeCheckpointSaver(str(tmp_path), {"model": network}, **settings)
    saver.metrics_completed(engine_at(1, metric=0.8))
    best = (tmp_path / "model.pt").read_bytes()
    state = saver.state_dict()

    torch.nn.init.zeros_(network.weight)
    resumed = checkpoints.SafeCheckpointSaver(str(tmp_path), {"model": network}, **settings)
    resumed.load_state_dict(state)
    resumed.metrics_completed(engine_at(2, metric=0.5))
    assert (tmp_path / "model.pt").read_bytes() == best
    resumed.metrics_completed(engine_at(3, metric=0.9))
    assert (tmp_path / "model.pt").read_bytes() != best and os.listdir(tmp_path) == ["model.pt"]


def test_resume_skips_an_unreadable_newer_checkpoint_and_names_it(tmp_path, caplog):
    torch.save({"trainer": {"epoch": 1}}, tmp_path / "checkpoint_epoch=1.pt")
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"")
    torch.save({"trainer": {"epoch": 10}}, tmp_path / "checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint_epoch=10.pt").write_bytes((tmp_path / "checkpoint_epoch=10.pt").read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=1.pt")
    assert "skipping checkpoint" in caplog.text and "checkpoint_epoch=10.pt" in caplog.text
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint in ckpt_dir .* can be read: .*checkpoint_epoch=10.pt"):
        checkpoints.latest_checkpoint(str(tmp_path))


def test_a_fresh_run_refuses_a_ckpt_dir_holding_weights_it_did_not_write(tmp_path):
    checkpoints.check_ckpt_dir(str(tmp_path / "absent"), resume=False, overwrite_weights=False)
    checkpoints.check_ckpt_dir(str(tmp_path), resume=False, overwrite_weights=False)  # empty
    (tmp_path / "model.pt").write_bytes(b"downloaded")
    with pytest.raises(FileExistsError, match=r"already holds \['model.pt'\].*--overwrite_weights True"):
        checkpoints.check_ckpt_dir(str(tmp_path), resume=False, overwrite_weights=False)
    checkpoints.check_ckpt_dir(str(tmp_path), resume=True, overwrite_weights=False)
    checkpoints.check_ckpt_dir(str(tmp_path), resume=False, overwrite_weights=True)
    # a run that starts from those weights (MONAI Label's training adds such a loader) continues them
    loader = checkpoints.CheckedCheckpointLoader(str(tmp_path / "model.pt"), {"model": torch.nn.Linear(2, 2)})
    checkpoints.check_ckpt_dir(str(tmp_path), resume=False, overwrite_weights=False, handlers=[loader])


def test_unreadable_weights_are_named(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    loader = checkpoints.CheckedCheckpointLoader(str(tmp_path / "model.pt"), {"model": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=rf"cannot load weights from {re.escape(str(tmp_path / 'model.pt'))}"):
        loader(engine_at(0))


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    keys = ["image"]
    transforms = Compose([RandSpatialCropSamplesd(keys, roi_size=(4, 4, 4), num_samples=2), RandFlipd(keys, prob=0.5)])
    states = checkpoints.RandomStates(transforms)
    assert len(states.transforms) >= 3  # the Compose, the crop and the flip (with any inner helpers)
    data = {"image": torch.arange(8**3, dtype=torch.float32).reshape(1, 8, 8, 8)}

    def draws():
        crops = transforms(dict(data))
        return [torch.rand(3), np.random.rand(3), [np.random.random() for _ in range(3)], [c["image"] for c in crops]]

    torch.save(states.state_dict(), tmp_path / "states.pt")
    first = draws()
    states.load_state_dict(torch.load(tmp_path / "states.pt", weights_only=True))
    second = draws()
    for a, b in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(first[3], second[3]):
        assert torch.equal(a, b)


# --- errors: the bundle's message last --------------------------------------------------------------------------
def test_root_error_skips_monai_wrappers():
    try:
        try:
            raise ValueError("image '/data/img0001.nii.gz' cannot be read")
        except ValueError as inner:
            raise RuntimeError("applying transform <LoadImaged>") from inner
    except RuntimeError as middle:
        outer = RuntimeError("Failed to evaluate ConfigExpression: @train#trainer.run()")
        outer.__cause__ = middle
    assert str(error_summary.root_error(outer)) == "image '/data/img0001.nii.gz' cannot be read"
    plain = KeyError("x")
    assert error_summary.root_error(plain) is plain


# --- content checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("breakage, message", [
    ("truncated", "cannot be read (EOFError"),
    ("2d", "is 2-D (48, 44); the bundle needs 3-D volumes"),
    ("4_channels", "has 4 channel(s) but the bundle expects 1"),
    ("nan", "holds 10 NaN or infinite voxels"),
    ("one_slice", "is a single slice (48, 44, 1); the bundle needs 3-D volumes"),
])  # fmt: skip
def test_every_image_is_read_whole_before_training(breakage, message, tmp_path):
    image, _, affine = synthetic_ct.make_case(seed=3, shape=(48, 44, 12))
    path = str(tmp_path / "img.nii.gz")
    if breakage == "2d":
        synthetic_ct.save_nifti(image[..., 0], affine, path)
    elif breakage == "one_slice":
        synthetic_ct.write_dicom_series(image[..., :1], affine, str(tmp_path / "dicom"))
        path = str(next((tmp_path / "dicom").iterdir()))  # a single 2-D DICOM file
    elif breakage == "4_channels":
        synthetic_ct.save_nifti(np.stack([image] * 4, axis=-1), affine, path)
    else:
        if breakage == "nan":
            image = image.astype(np.float32)
            image.flat[:10] = np.nan
        synthetic_ct.save_nifti(image, affine, path)
        if breakage == "truncated":
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError) as error:
        datalist.check_image(path)
    assert path in str(error.value) and message in str(error.value), str(error.value)


def test_a_truncated_training_case_stops_the_run_before_training_and_is_named_last(tmp_path):
    data = tmp_path / "data"
    synthetic_ct.generate(str(data), num_train=3, num_test=0, shape=(48, 44, 12))
    case = data / "imagesTr" / "img0002.nii.gz"
    case.write_bytes(case.read_bytes()[:2000])
    proc = run_bundle([TRAIN], "training", check=False, dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"), **TINY)
    assert proc.returncode != 0 and "Epoch: 1" not in proc.stdout + proc.stderr
    assert last_line(proc.stderr).startswith(f"ValueError: image {str(case)!r} cannot be read")


# --- end to end -------------------------------------------------------------------------------------------------
def test_training_refuses_to_replace_downloaded_weights(btcv_data, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"published weights")
    proc = run_bundle(
        [TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(models), **TINY,
    )  # fmt: skip
    assert proc.returncode != 0
    assert re.match(r"FileExistsError: ckpt_dir .* already holds \['model.pt'\]", last_line(proc.stderr))
    assert "--overwrite_weights True" in last_line(proc.stderr)
    assert (models / "model.pt").read_bytes() == b"published weights" and os.listdir(models) == ["model.pt"]


def test_inference_with_empty_weights_names_the_file_last(btcv_data, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    proc = run_bundle(
        [INFERENCE], check=False, dataset_dir=str(btcv_data / "imagesTs"), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "pred"), **TINY,
    )  # fmt: skip
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith(f"ValueError: cannot load weights from {tmp_path / 'models' / 'model.pt'}")
    assert not list(tmp_path.rglob("*_seg.nii.gz"))


# --- chaos: SIGKILL at chosen moments, then resume --------------------------------------------------------------
CHAOS = dict(TINY, max_epochs=3, val_interval=1, num_train_cases=2, learning_rate=1e-3)
LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([0-9.]+)")


def _train_until(args: list[str], moment, ckpt_dir) -> tuple[str, bool]:
    """Runs a training and SIGKILLs it when `moment(output_so_far)` says so; returns (output, killed)."""
    run = start_bundle_args(["run", "training", "--config_file", str(TRAIN)] + args)
    killed = False
    deadline = time.time() + 600
    while run.poll(timeout=0.005) is None and time.time() < deadline:
        if moment(run.output(), ckpt_dir):
            run.kill()
            killed = True
            break
    proc = run.wait(timeout=60)
    return proc.stdout + proc.stderr, killed


def _during_step_of_epoch_2(out, ckpt_dir):
    return "Epoch: 2/3, Iter: 1/2" in out


def _during_a_checkpoint_write(out, ckpt_dir):
    return any(n.startswith(".partial-") for n in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else False


def _during_validation_of_epoch_3(out, ckpt_dir):
    return "SupervisedEvaluator - INFO - Engine run resuming from iteration 0, epoch 2 until 3" in out


def test_training_killed_at_any_moment_resumes_to_the_uninterrupted_result(btcv_data, tmp_path):
    def args(ckpt_dir, **extra):
        settings = dict(CHAOS, dataset_dir=str(btcv_data), ckpt_dir=str(ckpt_dir), output_dir=str(ckpt_dir) + "_eval")
        return overrides_to_args(dict(settings, **extra))

    reference = run_bundle([TRAIN], "training", **dict(CHAOS, dataset_dir=str(btcv_data),
                           ckpt_dir=str(tmp_path / "ref"), output_dir=str(tmp_path / "ref_eval")))  # fmt: skip
    expected = {(e, i): loss for e, i, loss in LOSS.findall(reference.stdout + reference.stderr)}
    assert len(expected) == 6

    ckpt_dir = tmp_path / "chaos"
    seen: dict = {}
    moments = [_during_step_of_epoch_2, _during_a_checkpoint_write, _during_validation_of_epoch_3, None]
    for number, moment in enumerate(moments):
        resume = number > 0 and any(ckpt_dir.glob("checkpoint_epoch=*.pt"))
        out, killed = _train_until(args(ckpt_dir, resume=resume), moment or (lambda *_: False), ckpt_dir)
        assert killed == (moment is not None), out[-3000:]
        if resume:  # the log names the restored position
            assert re.search(r"resuming from \S+checkpoint_epoch=[1-9]\.pt after epoch [1-9], iteration [1-9]", out)
        for e, i, loss in LOSS.findall(out):
            assert loss == expected[(e, i)], f"epoch {e} iteration {i} after kill {number}: {loss} != {expected}"
            seen[(e, i)] = loss
        for path in ckpt_dir.glob("[!.]*.pt"):  # whatever the moment, every file left under its own name loads
            torch.load(path, weights_only=True)
    assert seen == expected
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint_epoch=3.pt", "model.pt"]
    for name in ["checkpoint_epoch=3.pt", "model.pt"]:
        ours, ref = (torch.load(folder / name, weights_only=True) for folder in (ckpt_dir, tmp_path / "ref"))
        ours, ref = (ours["model"], ref["model"]) if name.startswith("checkpoint") else (ours, ref)
        assert max((ours[k].float() - ref[k].float()).abs().max().item() for k in ref) <= 1e-6, name


def test_inference_stops_on_a_bad_image_or_skips_it_when_asked(tmp_path):
    images, models = tmp_path / "images", tmp_path / "models"
    synthetic_ct.generate(str(tmp_path / "data"), num_train=0, num_test=2, shape=(48, 44, 12))
    images.mkdir()
    models.mkdir()
    for case in sorted((tmp_path / "data" / "imagesTs").iterdir()):
        case.rename(images / case.name)
    good, bad = sorted(images.iterdir())
    bad.write_bytes(bad.read_bytes()[:2000])
    from monai.networks.nets import SwinUNETR

    torch.save(SwinUNETR(1, 14, feature_size=12).state_dict(), models / "model.pt")
    settings = dict(TINY, dataset_dir=str(images), ckpt_dir=str(models), output_dir=str(tmp_path / "pred"))
    proc = run_bundle([INFERENCE], check=False, **settings)
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith(f"ValueError: image {str(bad)!r} cannot be read")
    assert "--skip_bad_images True" in last_line(proc.stderr) and not list(tmp_path.rglob("*_seg.nii.gz"))

    proc = run_bundle([INFERENCE], skip_bad_images=True, **settings)
    assert f"skipping image {str(bad)!r}: it cannot be read" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [good.name.replace(".nii.gz", "_seg.nii.gz")]
