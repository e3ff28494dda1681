"""`ci/learning_curves.py`'s summary and check, on curves written as the bundle's `training_curves.csv` writes them."""

import csv
import json

import learning_curves
import pytest


def write_curve(folder, arm, seed, points):
    """`points`: (step, seconds, mean Dice, liver Dice) per validation."""
    (folder / "runs").mkdir(exist_ok=True)
    with open(folder / "runs" / f"{arm}_seed{seed}.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "epoch", "seconds", "val_mean_dice", "liver"])
        for step, seconds, dice, liver in points:
            writer.writerow([step, step // 8, seconds, dice, liver])


def test_summary_is_mean_min_max_over_the_seeds_that_finished_and_minutes_their_median(tmp_path):
    write_curve(tmp_path, "shipped", 0, [(32, 60, 0.10, 0.5), (64, 120, 0.20, 0.7)])
    write_curve(tmp_path, "shipped", 1, [(32, 90, 0.20, 0.6), (64, 150, 0.30, 0.8)])
    write_curve(tmp_path, "shipped", 2, [(32, 600, 0.30, 0.7), (64, 900, 0.40, 0.9)])
    write_curve(tmp_path, "reference", 0, [(32, 70, 0.12, 0.5), (64, 130, 0.21, 0.7)])
    rows = learning_curves.summarise(str(tmp_path), ["shipped", "reference", "unet"], [0, 1, 2])
    shipped = [r for r in rows if r["arm"] == "shipped"]
    assert [r["step"] for r in shipped] == [32, 64] and all(r["seeds"] == 3 for r in shipped)
    assert shipped[1]["val_mean_dice"] == pytest.approx(0.3)
    assert (shipped[1]["val_mean_dice_min"], shipped[1]["val_mean_dice_max"]) == (0.2, 0.4)
    assert shipped[1]["liver"] == pytest.approx(0.8)
    assert shipped[0]["minutes"] == pytest.approx(1.5)  # the median, not the mean a slow run would pull up
    assert {r["arm"] for r in rows} == {"shipped", "reference"}  # an arm with no finished run has no rows
    with open(tmp_path / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


@pytest.mark.parametrize("gap, within", [(0.029, True), (-0.029, True), (0.031, False), (-0.05, False)])
def test_check_holds_the_shipped_mean_within_the_tolerance_of_the_reference_at_every_step(gap, within):
    rows = [
        {"arm": "shipped", "step": 32, "val_mean_dice": 0.1},
        {"arm": "shipped", "step": 64, "val_mean_dice": 0.2 + gap},
        {"arm": "reference", "step": 32, "val_mean_dice": 0.1},
        {"arm": "reference", "step": 64, "val_mean_dice": 0.2},
    ]
    result = learning_curves.check(rows)
    assert result["within"] is within and result["steps"] == [32, 64]
    assert result["largest_difference"] == pytest.approx(gap)
    json.dumps(result)  # written to check.json


def test_budgets_that_are_not_whole_epochs_or_unknown_arms_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiples of 8"):
        learning_curves.main(out_dir=str(tmp_path), steps=100)
    with pytest.raises(ValueError, match="not among"):
        learning_curves.main(out_dir=str(tmp_path), arms=("shipped", "bigger"))


def test_summary_only_reads_the_finished_runs_and_trains_nothing(tmp_path):
    write_curve(tmp_path, "shipped", 0, [(32, 60, 0.10, 0.5)])
    write_curve(tmp_path, "reference", 0, [(32, 60, 0.12, 0.5)])
    result = learning_curves.main(out_dir=str(tmp_path), arms=("shipped", "reference", "unet"), train=False)
    assert result["steps"] == [32] and result["within"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "work").exists()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
