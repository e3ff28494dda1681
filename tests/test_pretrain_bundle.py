"""The pre-training bundle end to end through `python -m monai.bundle`, and its hand-off to BTCV fine-tuning."""

import re
import shutil

import numpy as np
import pytest
import torch
from conftest import BUNDLES, TINY, run_bundle
from monai.networks.nets import SwinUNETR

CONFIGS = BUNDLES / "swin_unetr_pretrain" / "configs"
TRAIN, EVALUATE, MULTI_GPU = CONFIGS / "train.json", CONFIGS / "evaluate.json", CONFIGS / "multi_gpu_train.json"
BTCV_TRAIN = BUNDLES / "swin_unetr_btcv" / "configs" / "train.json"
TERMS = re.compile(r"Iter: \d+/\d+ -- contrast: ([0-9.]+) inpaint: ([0-9.]+) rotation: ([0-9.]+) total: ([0-9.]+)")
# 4 training volumes in batches of 2: 2 iterations an epoch; contrastive learning needs 2+ sub-volumes a batch.
# 64 x 64 x 32 sub-volumes cost half a 64^3 step and keep a 2 x 2 x 1 bottleneck (the contrastive head needs 2+
# tokens); the rotations turn the 64 x 64 axial plane.
SSL_TINY = {
    "feature_size": 12, "roi_size": [64, 64, 32], "num_samples": 1, "batch_size": 2, "num_workers": 0,
    "use_checkpoint": False, "warmup_steps": 2, "projection_dim": 64, "learning_rate": 2e-4,
    "image_glob": "imagesTr/*.nii.gz", "val_fraction": 0.2,
}  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(btcv_data, tmp_path_factory):
    """16 iterations of tiny pre-training on the synthetic CTs (labels unused), tracked with MLflow; returns (run
    folder, log)."""
    out = tmp_path_factory.mktemp("ssl_run")
    proc = run_bundle(
        [TRAIN], "training", dataset_dir=str(btcv_data), ckpt_dir=str(out / "models"), output_dir=str(out / "eval"),
        max_epochs=8, val_interval=4, tracking="mlflow", **SSL_TINY,
    )  # fmt: skip
    return out, proc.stdout + proc.stderr


def test_pretraining_logs_three_terms_and_learns(pretrained):
    out, log = pretrained
    terms = np.array([[float(v) for v in m] for m in TERMS.findall(log)])
    assert terms.shape == (16, 4)
    np.testing.assert_allclose(terms[:, :3].sum(axis=1), terms[:, 3], atol=2e-4)  # weights 1: total = sum
    assert terms[-4:, 3].mean() < terms[:4, 3].mean()
    assert terms[-4:, 1].mean() < 0.9 * terms[:4, 1].mean()  # inpainting learns fastest
    # one validation sub-volume: no negatives, so the contrastive term and its chance line ln(2B - 1) are both 0
    metrics = re.findall(r"Metrics -- val_contrast: (\S+) val_contrast_chance: (\S+) val_l1: [0-9.]+ "
                         r"val_l1_blurred_input: [0-9.]+ val_rotation_accuracy: [0-9.]+", log)  # fmt: skip
    assert metrics == [("0.0000", "0.0000")] * 4
    assert "cpu_memory_pool: freed memory stays in the process" in log  # on by default for CPU training


def test_pretraining_writes_checkpoints_and_encoder(pretrained):
    out, _ = pretrained
    models = out / "models"
    assert {p.name for p in models.iterdir()} == {"model.pt", "model_swinvit.pt", "checkpoint_iteration=16.pt"}
    encoder = torch.load(models / "model_swinvit.pt", weights_only=True)
    assert list(encoder) == ["state_dict"]
    assert encoder["state_dict"]["module.patch_embed.proj.weight"].shape == (12, 1, 2, 2, 2)
    assert "module.layers4.0.blocks.1.mlp.fc2.weight" in encoder["state_dict"]
    assert list((out / "eval").glob("events.out.tfevents.*"))


def test_exported_encoder_loads_with_swinunetr_load_from(pretrained):
    out, _ = pretrained
    weights = torch.load(out / "models" / "model_swinvit.pt", weights_only=True)
    net = SwinUNETR(1, 14, feature_size=12)
    net.load_from(weights)
    torch.testing.assert_close(
        net.swinViT.patch_embed.proj.weight, weights["state_dict"]["module.patch_embed.proj.weight"]
    )
    torch.testing.assert_close(
        net.swinViT.layers3[0].blocks[1].mlp.linear1.weight,
        weights["state_dict"]["module.layers3.0.blocks.1.mlp.fc1.weight"],
    )


def test_validation_writes_reconstruction_pictures_and_mlflow_tracks_the_run(pretrained):
    """Each of the 4 validations writes a reconstruction picture; MLflow holds the settings, every iteration's terms,
    the config, the pictures and the training curves."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    out, _ = pretrained
    pictures = sorted((out / "eval" / "pictures").iterdir())
    assert [p.name for p in pictures] == [f"reconstruction_{i}.png" for i in range(1, 5)]
    with Image.open(pictures[0]) as picture:
        assert picture.format == "PNG" and picture.size == (810, 810)
    assert (out / "eval" / "training_curves.png").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["temperature"] == "0.5" and run.data.params["roi_size"] == "[64, 64, 32]"
    for term in ("total", "inpaint", "contrast", "rotation"):  # 16 iterations
        assert len(client.get_metric_history(run.info.run_id, term)) == 16, term
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert logged[0].startswith("config_")
    assert logged[1:] == [p.name for p in pictures] + ["training_curves.png"]


def test_resume_continues_the_iteration_count(pretrained, btcv_data, tmp_path):
    out, _ = pretrained
    shutil.copytree(out / "models", tmp_path / "models")
    proc = run_bundle(
        [TRAIN], "training", dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), max_epochs=10, val_interval=4, resume=True, **SSL_TINY,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert re.search(r"Restored all variables from .*checkpoint_iteration=16.pt", log)
    assert "Epoch: 9/10, Iter: 1/2" in log and "Epoch: 1/10" not in log
    assert len(TERMS.findall(log)) == 4
    state = torch.load(tmp_path / "models" / "checkpoint_iteration=20.pt", weights_only=False)
    assert state["trainer"]["iteration"] == 20


def test_fine_tuning_starts_from_the_exported_encoder(pretrained, btcv_data, tmp_path):
    out, _ = pretrained
    encoder = torch.load(out / "models" / "model_swinvit.pt", weights_only=True)["state_dict"]
    proc = run_bundle(
        [BTCV_TRAIN], "training", dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), max_epochs=1, val_interval=1, use_pretrained=True,
        pretrained_path=str(out / "models" / "model_swinvit.pt"), learning_rate=0.0, num_train_cases=1, **TINY,
    )  # fmt: skip
    assert re.search(r"loaded 126 of 126 encoder tensors", proc.stdout + proc.stderr)
    tuned = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert torch.equal(tuned["swinViT.patch_embed.proj.weight"], encoder["module.patch_embed.proj.weight"])
    assert torch.equal(
        tuned["swinViT.layers2.0.blocks.0.mlp.linear2.weight"], encoder["module.layers2.0.blocks.0.mlp.fc2.weight"]
    )


def test_evaluate_reports_each_proxy_task_beside_its_chance_line(pretrained, btcv_data):
    """On 2 validation volumes in one batch (B = 2 sub-volumes, 4 views), each proxy task beside its chance line."""
    out, _ = pretrained
    proc = run_bundle(
        [TRAIN, EVALUATE], dataset_dir=str(btcv_data), ckpt_dir=str(out / "models"), output_dir=str(out / "evaluation"),
        **dict(SSL_TINY, val_fraction=0.4),
    )  # fmt: skip
    assert "Restored all variables from" in proc.stdout + proc.stderr
    metrics = dict(line.split(",") for line in (out / "evaluation" / "metrics.csv").read_text().split("\n") if line)
    metrics = {name: float(value) for name, value in metrics.items()}
    assert set(metrics) == {"val_l1", "val_l1_blurred_input", "val_rotation_accuracy", "val_contrast",
                            "val_contrast_chance"}  # fmt: skip
    assert metrics["val_contrast_chance"] == pytest.approx(np.log(3), rel=1e-6)
    assert 0.0 < metrics["val_contrast"] and 0.0 <= metrics["val_rotation_accuracy"] <= 1.0
    assert 0.0 < metrics["val_l1_blurred_input"] < 1.0 and 0.0 < metrics["val_l1"]


def test_multi_gpu_pretraining_runs_two_processes_on_cpu(btcv_data, tmp_path):
    proc = run_bundle(
        [TRAIN, MULTI_GPU], "training", torchrun=2, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), max_epochs=1, val_interval=1,
        **dict(SSL_TINY, batch_size=2, val_fraction=0.4),
    )  # fmt: skip
    # 3 training volumes sharded over 2 ranks (padded to 2 each): one batch of 2 per rank, logged by rank 0 only
    assert len(TERMS.findall(proc.stdout + proc.stderr)) == 1
    assert (tmp_path / "models" / "model_swinvit.pt").is_file()
    assert (tmp_path / "models" / "checkpoint_iteration=1.pt").is_file()


def test_bad_dataset_dir_is_a_clear_error(tmp_path):
    proc = run_bundle([TRAIN], "training", check=False, dataset_dir=str(tmp_path / "nothing"), **SSL_TINY)
    assert proc.returncode != 0
    assert f"dataset_dir '{tmp_path / 'nothing'}' does not exist" in proc.stderr


def test_roi_with_unequal_sides_in_the_rotation_plane_is_refused_before_training(btcv_data, tmp_path):
    settings = dict(SSL_TINY, roi_size=[64, 32, 64])
    proc = run_bundle([TRAIN], "training", check=False, dataset_dir=str(btcv_data), ckpt_dir=str(tmp_path), **settings)
    assert proc.returncode != 0
    assert (
        "roi_size [64, 32, 64] has sides 64 and 32 in the rotation plane rotation_axes=[0, 1]; they must be equal"
        in proc.stderr
    )
    assert "Iter:" not in proc.stdout + proc.stderr
