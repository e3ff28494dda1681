"""The SSL experiment's runner, end to end on its tiny preset: data, pre-training, three arms, summary, resume."""

import csv
import json
import math
import os

import encoder_collapse
import pytest
import ssl_experiment
import torch
from conftest import load_bundle_scripts, run_bundle_args


@pytest.mark.parametrize("differences, verdict", [
    ([0.03, 0.01, 0.05], "better"),
    ([0.10, 0.05, -0.001], "no clear difference"),  # one seed disagrees
    ([0.01, 0.01, 0.01], "no clear difference"),  # consistent but below the threshold
    ([-0.02, -0.03, -0.04], "worse"),
])  # fmt: skip
def test_protocol_rule(differences, verdict):
    assert ssl_experiment.call(differences) == verdict


def test_summary_pairs_the_seeds_both_arms_finished(tmp_path):
    """Summarised before every run has finished (e.g. after a stop), each comparison uses the shared seeds only."""
    runs = [("scratch", 0, 0.10), ("scratch", 1, 0.20), ("pretrained", 0, 0.15), ("shuffled", 1, 0.1)]
    rows = [{"arm": arm, "labelled_cases": 2, "seed": seed, "mean_dice": dice} for arm, seed, dice in runs]
    summary = {row["arm"]: row for row in ssl_experiment.summarise(str(tmp_path), rows)}
    assert summary["scratch"]["seeds"] == 2 and summary["scratch"]["mean_dice"] == pytest.approx(0.15)
    assert summary["pretrained"]["minus_scratch"] == "+0.0500" and summary["pretrained"]["minus_shuffled"] == ""
    assert summary["shuffled"]["minus_scratch"] == "-0.1000"
    assert (tmp_path / "dice_vs_labelled_cases.png").is_file()


def test_rotation_gate_is_a_one_sided_binomial_test():
    assert ssl_experiment.binomial_p_value(4, 6, 0.25) == pytest.approx(0.03760, abs=1e-5)  # 4 of 6: passes
    assert ssl_experiment.binomial_p_value(3, 6, 0.25) == pytest.approx(0.16943, abs=1e-5)  # 3 of 6: does not
    assert ssl_experiment.binomial_p_value(0, 6, 0.25) == pytest.approx(1.0)


LEARNED = {"val_contrast": 0.9, "val_contrast_chance": math.log(3), "val_rotation_accuracy": 4 / 6, "val_l1": 0.04,
           "val_l1_blurred_input": 0.05}  # fmt: skip


@pytest.mark.parametrize("changed, failed", [
    ({}, None),
    ({"val_contrast": 1.0}, "contrastive"),  # below ln 3 = 1.099, but not by 10%
    ({"val_contrast": 0.0, "val_contrast_chance": 0.0}, "contrastive"),  # one sub-volume a batch: not measurable
    ({"val_rotation_accuracy": 3 / 6}, "rotation"),  # above 1/4, but 3 of 6 is p = 0.17
    ({"val_l1": 0.046}, "inpainting"),  # better than the blurred input, but not by 10%
])  # fmt: skip
def test_pretraining_gate_needs_each_term_clearly_past_its_chance_level(changed, failed):
    gate = ssl_experiment.pretraining_gate(dict(LEARNED, **changed), rotation_predictions=6)
    assert gate["passed"] == (failed is None)
    assert [name for name, term in gate["terms"].items() if not term["passed"]] == ([failed] if failed else [])
    assert gate["terms"]["contrastive"]["level"] == dict(LEARNED, **changed)["val_contrast_chance"]


def test_finetuning_gate_reads_the_scratch_arm_at_the_largest_count():
    rows = [{"arm": "scratch", "labelled_cases": 6, "seed": s, "mean_dice": d} for s, d in enumerate((0.45, 0.6))]
    rows += [{"arm": "scratch", "labelled_cases": 2, "seed": 0, "mean_dice": 0.1},
             {"arm": "pretrained", "labelled_cases": 6, "seed": 0, "mean_dice": 0.1}]  # fmt: skip
    gate = ssl_experiment.finetuning_gate(rows, largest=6)
    assert gate["passed"] and gate["value"] == pytest.approx(0.525) and gate["seeds"] == 2
    assert not ssl_experiment.finetuning_gate(rows[:1], largest=6)["passed"]
    assert not ssl_experiment.finetuning_gate(rows, largest=8)["passed"]  # no run at that count yet


def test_an_experiment_that_is_not_powered_draws_no_comparison(tmp_path):
    runs = [("scratch", 0, 0.10), ("pretrained", 0, 0.30), ("shuffled", 0, 0.1)]
    rows = [{"arm": arm, "labelled_cases": 2, "seed": seed, "mean_dice": dice} for arm, seed, dice in runs]
    summary = {row["arm"]: row for row in ssl_experiment.summarise(str(tmp_path), rows, powered=False)}
    assert summary["pretrained"]["vs_scratch"] == summary["pretrained"]["vs_shuffled"] == "not powered"
    assert summary["pretrained"]["minus_scratch"] == "" and summary["pretrained"]["mean_dice"] == pytest.approx(0.3)


def forked_bundle_run(args: list[str], log_path: str) -> None:
    """`ssl_experiment.bundle_run` through the suite's forking launcher (same command, working folder and log)."""
    proc = run_bundle_args(["run", *args], cwd=os.getcwd())
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{proc.stderr[-3000:]}\nbundle run failed (exit {proc.returncode}); full log: {log_path}")


def test_a_failed_bundle_run_raises_with_the_end_of_its_log(tmp_path):
    """The runner's own launcher (a fresh `python -m monai.bundle`), which the tiny run below replaces by a fork."""
    log = tmp_path / "logs" / "broken.log"
    with pytest.raises(RuntimeError, match=r"bundle run failed \(exit 1\); full log: .*broken\.log"):
        ssl_experiment.bundle_run(["--config_file", str(tmp_path / "missing.json")], str(log))
    assert "missing.json" in log.read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset, given a relative out_dir as a user would type it."""
    out = tmp_path_factory.mktemp("ssl_tiny")
    here = os.getcwd()
    os.chdir(out.parent)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ssl_experiment, "bundle_run", forked_bundle_run)
            ssl_experiment.main(preset="tiny", out_dir=out.name)
    finally:
        os.chdir(here)
    return out


def test_every_arm_count_and_seed_is_scored_on_the_test_cases(tiny_run):
    preset = ssl_experiment.PRESETS["tiny"]
    rows = list(csv.DictReader(open(tiny_run / "results.csv")))
    expected = {(arm, str(n), str(s)) for arm in ssl_experiment.ARMS for n in preset.label_counts for s in preset.seeds}
    assert {(r["arm"], r["labelled_cases"], r["seed"]) for r in rows} == expected
    for row in rows:
        assert 0.0 <= float(row["mean_dice"]) <= 1.0
        assert set(ssl_experiment.ORGANS) <= set(row)
    summary = list(csv.DictReader(open(tiny_run / "summary.csv")))
    pretrained = [r for r in summary if r["arm"] == "pretrained"]
    assert all(r["vs_scratch"] == r["vs_shuffled"] == "not powered" for r in pretrained)  # 2 steps learn nothing
    hardness = json.loads((tiny_run / "data" / "hardness.json").read_text())
    assert 0.0 < hardness["hu_lookup_mean_dice"] < 1.0 and 0.0 < hardness["mean_crop_overlap"] <= 1.0
    for picture in ("dice_vs_labelled_cases.png", "pretraining_curves.png"):
        assert (tiny_run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gates_are_measured_on_held_out_phantoms_and_reported(tiny_run):
    """Gate (a) from the pre-training bundle's evaluation of the test phantoms' images (1 CT x 2 sub-volumes: B = 2,
    4 views), gate (b) from the scratch runs; the tiny budget passes neither."""
    gates = json.loads((tiny_run / "gates.json").read_text())
    terms = gates["pretraining"]["terms"]
    assert terms["contrastive"]["level"] == pytest.approx(math.log(3), rel=1e-6)
    assert terms["rotation"]["level"] == 0.25 and terms["rotation"]["views"] == 4
    assert 0.0 < terms["inpainting"]["level"] < 1.0 and terms["inpainting"]["value"] > 0.0
    assert gates["finetuning"]["labelled_cases"] == 1 and gates["finetuning"]["seeds"] == 1
    assert not gates["finetuning"]["passed"] and gates["powered"] is False
    log = (tiny_run / "logs" / "pretrain_gate.log").read_text()
    assert str(tiny_run / "pretrain" / "gate" / "held_out.json") in log and "Restored all variables from" in log
    held_out = json.loads((tiny_run / "pretrain" / "gate" / "held_out.json").read_text())["validation"]
    test_cases = json.loads((tiny_run / "data" / "test.json").read_text())["validation"]
    assert [c["image"] for c in held_out] == [c["image"] for c in test_cases]


def test_pretraining_checkpoint_holds_its_contrast_queue(tiny_run):
    """The tiny preset pre-trains with contrast_queue_size 4: the training checkpoint carries the queue, full after
    its 2 steps of 2 sub-volumes x 2 views, so a resumed run continues with the same negatives."""
    import torch

    (checkpoint,) = (tiny_run / "pretrain" / "models").glob("checkpoint_*.pt")
    queue = torch.load(checkpoint, map_location="cpu", weights_only=True)["contrast_queue"]
    assert queue["queued.queue"].shape == (4, 512) and int(queue["queued.filled"]) == 4
    assert torch.allclose(queue["queued.queue"].norm(dim=1), torch.ones(4))  # normalised projections
    assert "> contrast_queue_size: 4" in (tiny_run / "logs" / "pretrain.log").read_text()


def test_relative_spread_is_zero_only_when_every_input_gives_the_same_output():
    assert encoder_collapse.relative_spread(torch.arange(5.0).expand(3, 4, 5)) == 0.0
    assert encoder_collapse.relative_spread(torch.tensor([[1.0, -1.0], [-1.0, 1.0]])) == pytest.approx(math.sqrt(2))


def test_encoder_collapse_compares_each_stage_with_a_fresh_network(tiny_run):
    """`ci/encoder_collapse.py` on the tiny run: the held-out CT and its turn in the rotation plane through the
    pre-trained and a fresh encoder, one spread per stage; a fresh network tells its inputs apart at every stage."""
    load_bundle_scripts("swin_unetr_pretrain")  # another bundle's `scripts` may be imported in this process
    record = encoder_collapse.main(out_dir=str(tiny_run))
    assert record["views"] == 2 * ssl_experiment.PRESETS["tiny"].num_test and record["input"] > 0.1
    assert len(record["trained"]) == len(record["initial"]) == 5  # patch embedding and four Swin stages
    assert all(spread > 0.01 for spread in record["initial"]) and all(spread > 0.0 for spread in record["trained"])
    assert json.loads((tiny_run / "pretrain" / "encoder_collapse.json").read_text()) == record


@pytest.mark.parametrize("pretraining_passed, scratch_dice, runs", [(True, 0.6, 12), (False, 0.6, 2), (True, 0.4, 2)])
def test_gates_come_first_and_the_comparison_runs_only_once_both_pass(
    pretraining_passed, scratch_dice, runs, tmp_path, monkeypatch
):
    """The scratch runs at the largest labelled count are made first; the other arms and counts follow only when
    gate (a) and gate (b) both pass."""
    made = []

    def fake_finetune(out_dir, preset, lists, arm, cases, seed, encoders):
        made.append((arm, cases, seed))
        return {"arm": arm, "labelled_cases": cases, "seed": seed, "mean_dice": scratch_dice}

    preset = ssl_experiment.Preset(
        fov_scale=0.45, num_unlabelled=2, num_val=1, num_test=1, label_counts=(1, 2), seeds=(0, 1),
        feature_size=12, roi_size=64, pretrain_epochs=1, pretrain_batch=1, pretrain_val_every=1, finetune_steps=1,
        finetune_val_every=1,
    )  # fmt: skip
    gate = {
        "passed": pretraining_passed,
        "terms": {"inpainting": {"value": 0.1, "level": 0.2, "rule": "", "passed": True}},
    }
    monkeypatch.setitem(ssl_experiment.PRESETS, "fake", preset)
    monkeypatch.setattr(
        ssl_experiment, "prepare_data", lambda out_dir, preset: {"test": "t.json", "pretrain": "p.json"}
    )
    monkeypatch.setattr(ssl_experiment, "pretrain", lambda out_dir, preset, datalist: "model_swinvit.pt")
    monkeypatch.setattr(ssl_experiment, "measure_pretraining_gate", lambda out_dir, preset, test_list: gate)
    monkeypatch.setattr(ssl_experiment, "plot_pretraining_terms", lambda *args: None)
    monkeypatch.setattr(ssl_experiment, "shuffled_encoder", lambda encoder: "shuffled.pt")
    monkeypatch.setattr(ssl_experiment, "finetune", fake_finetune)
    ssl_experiment.main(preset="fake", out_dir=str(tmp_path))
    assert made[:2] == [("scratch", 2, 0), ("scratch", 2, 1)] and len(made) == len(set(made)) == runs
    powered = runs == 12  # 3 arms x 2 labelled counts x 2 seeds
    assert json.loads((tmp_path / "gates.json").read_text())["powered"] == powered
    with open(tmp_path / "summary.csv") as f:
        calls = {row["vs_scratch"] for row in csv.DictReader(f) if row["arm"] != "scratch"}
    assert calls == ({"no clear difference"} if powered else set())


def test_runs_differ_only_in_their_public_settings(tiny_run):
    """Each arm starts from what it says (the log of the bundle names the encoder it loaded), the labelled count
    and seed reach the bundle, and the test evaluation reads the test list."""
    logs = tiny_run / "logs"
    pretrained = str(tiny_run / "pretrain" / "models" / "model_swinvit.pt")
    shuffled = pretrained.replace("model_swinvit.pt", "model_swinvit_shuffled.pt")
    for n in ssl_experiment.PRESETS["tiny"].label_counts:
        scratch_log = (logs / f"scratch_n{n}_s0_train.log").read_text()
        assert "encoder tensors from" not in scratch_log and f"> num_train_cases: {n}" in scratch_log
        assert f"encoder tensors from {pretrained}" in (logs / f"pretrained_n{n}_s0_train.log").read_text()
        assert f"encoder tensors from {shuffled}" in (logs / f"shuffled_n{n}_s0_train.log").read_text()
        assert str(tiny_run / "data" / "test.json") in (logs / f"scratch_n{n}_s0_test.log").read_text()


def test_control_encoder_has_the_same_values_in_another_order(tiny_run):
    models = tiny_run / "pretrain" / "models"
    trained = torch.load(models / "model_swinvit.pt", weights_only=True)["state_dict"]
    shuffled = torch.load(models / "model_swinvit_shuffled.pt", weights_only=True)["state_dict"]
    assert trained.keys() == shuffled.keys()
    reordered = 0
    for key, tensor in trained.items():
        assert shuffled[key].shape == tensor.shape
        torch.testing.assert_close(shuffled[key].flatten().sort().values, tensor.flatten().sort().values)
        reordered += not torch.equal(shuffled[key], tensor)
    assert reordered > len(trained) // 2


def test_a_finished_experiment_resumes_without_running_anything(tiny_run, monkeypatch):
    before = (tiny_run / "results.csv").read_text()

    def no_runs(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(ssl_experiment, "bundle_run", no_runs)
    ssl_experiment.main(preset="tiny", out_dir=str(tiny_run))
    assert (tiny_run / "results.csv").read_text() == before
    assert json.loads((tiny_run / "preset.json").read_text())["preset"] == "tiny"


def test_an_unfinished_run_is_run_again(tiny_run, monkeypatch):
    """A run whose result file is missing (killed before its evaluation finished) starts again from scratch."""
    result = tiny_run / "runs" / "shuffled_n1_s0" / "result.json"
    kept = result.read_text()
    result.unlink()
    calls = []

    def record(args, log_path):
        calls.append(log_path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ssl_experiment, "bundle_run", record)
    with pytest.raises(RuntimeError, match="stop here"):
        ssl_experiment.main(preset="tiny", out_dir=str(tiny_run))
    assert calls == [str(tiny_run / "logs" / "shuffled_n1_s0_train.log")]
    assert not (tiny_run / "runs" / "shuffled_n1_s0").exists()  # the unfinished run's files are cleared first
    result.parent.mkdir(parents=True)
    result.write_text(kept)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset must be one of \\['cpu', 'gpu', 'tiny'\\], got 'huge'"):
        ssl_experiment.main(preset="huge", out_dir="unused")
