"""Single model vs mirroring TTA vs 5-fold ensemble vs both, from the MSD bundle on synthetic Task03_Liver folders.

Drives `python -m monai.bundle run` only, with the bundle's public settings; the table it prints goes to the MSD
model card. The protocol, fixed before any run:

- data: `ci/synthetic_msd.py` writes a training folder (10 cases, seed 0) that the bundle splits into its 5 folds
  (8 train / 2 validate each), and a held-out folder (4 cases, seed 1) that no fold sees; every arm is scored on
  the held-out cases through a `datalist` whose validation list is those 4 cases.
- training: each fold `k` with `--fold k --ckpt_dir <run>/models/fold<k>`, the quickstart's short-budget settings
  (feature 12, 64^3 patches, one patch a step, learning rate 2e-3, 2 warm-up epochs) for `max_epochs` epochs,
  validated once at the end (so `model.pt` is the final weights).
- arms: fold 0 alone; fold 0 with `--tta True`; the five folds through `inference_ensemble.json`; both.
- reported: Dice and NSD per class and their means over the held-out cases, as they come out.

    python ci/msd_tta_ensemble.py --run_dir experiments/msd_tta_ensemble

Folds whose `model.pt` already exists are not trained again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "ci"))
from ssl_experiment import bundle_run, settings, write_json_atomic  # noqa: E402
from synthetic_msd import generate_task  # noqa: E402

CONFIGS = os.path.join(REPO, "bundles", "swin_unetr_msd", "configs")
TASK = "Task03_Liver"
TASK_FILE = os.path.join(CONFIGS, "tasks", f"{TASK}.json")
NUM_FOLDS = 5  # the folds inference_ensemble.json averages
SHORT_BUDGET = {"feature_size": 12, "roi_size": [64, 64, 64], "use_checkpoint": False, "num_samples": 1}
SHORT_BUDGET.update(num_workers=2, sw_batch_size=2)
ARMS = {  # name: (extra config files, extra settings; "{models}" is the folder holding fold0..4)
    "single model (fold 0)": ([], {"ckpt_dir": "{models}/fold0"}),
    "mirroring TTA": ([], {"ckpt_dir": "{models}/fold0", "tta": True}),
    "5-fold ensemble": (["inference_ensemble.json"], {"ckpt_dir": "{models}"}),
    "ensemble + TTA": (["inference_ensemble.json"], {"ckpt_dir": "{models}", "tta": True}),
}


def config_files(*names: str) -> list[str]:
    """`--config_file` for the bundle's `names`, with the task file last so that it overrides them."""
    return ["--config_file", str([os.path.join(CONFIGS, name) for name in names] + [TASK_FILE])]


def per_class(output_dir: str, metric: str) -> list[float]:
    """Mean over the scored cases of each class, from MetricsSaver's `<metric>_summary.csv`."""
    with open(os.path.join(output_dir, f"{metric}_summary.csv")) as f:
        return [float(row["mean"]) for row in csv.DictReader(f) if row["class"].startswith("class")]


def main(run_dir: str = "experiments/msd_tta_ensemble", max_epochs: int = 15) -> None:
    """Generates the data, trains the folds, scores the four arms; prints a markdown table and writes
    `<run_dir>/results.json`."""
    run_dir = os.path.abspath(run_dir)
    train_dir, heldout_dir, models = (os.path.join(run_dir, name) for name in ("train_data", "heldout", "models"))
    if not os.path.isfile(os.path.join(train_dir, "dataset.json")):
        generate_task(train_dir, TASK, num_train=10, num_test=0, seed=0)
    heldout_list = os.path.join(heldout_dir, "heldout.json")
    if not os.path.isfile(heldout_list):
        generate_task(heldout_dir, TASK, num_train=4, num_test=0, seed=1)
        with open(os.path.join(heldout_dir, "dataset.json")) as f:
            cases = json.load(f)["training"]
        write_json_atomic({"training": cases, "validation": cases}, heldout_list)
    for fold in range(NUM_FOLDS):
        fold_dir = os.path.join(models, f"fold{fold}")
        if os.path.isfile(os.path.join(fold_dir, "model.pt")):
            continue
        schedule = {"max_epochs": max_epochs, "val_interval": max_epochs, "warmup_epochs": 2, "learning_rate": 0.002}
        args = settings(dataset_dir=train_dir, fold=fold, ckpt_dir=fold_dir, output_dir=os.path.join(fold_dir, "eval"))
        bundle_run(["training", *config_files("train.json"), *args, *settings(**SHORT_BUDGET, **schedule)],
                   os.path.join(fold_dir, "training.log"))  # fmt: skip
        print(f"fold {fold} trained", flush=True)
    with open(TASK_FILE) as f:
        class_names = [name for key, name in sorted(json.load(f)["labels"].items()) if key != "0"]
    results: dict = {"task": TASK, "max_epochs": max_epochs, "arms": {}}
    for slug, (name, (extra_files, extra)) in zip(("single", "tta", "ensemble", "both"), ARMS.items()):
        output_dir = os.path.join(run_dir, "scores", slug)
        arm = {key: value.format(models=models) if isinstance(value, str) else value for key, value in extra.items()}
        args = settings(dataset_dir=heldout_dir, datalist=heldout_list, output_dir=output_dir, **SHORT_BUDGET, **arm)
        bundle_run([*config_files("train.json", "evaluate.json", *extra_files), *args], output_dir + ".log")
        dice, nsd = per_class(output_dir, "val_mean_dice"), per_class(output_dir, "val_nsd")
        results["arms"][name] = {"dice": dict(zip(class_names, dice)), "nsd": dict(zip(class_names, nsd))}
        print(f"{name} scored", flush=True)
    header = "| arm | " + " | ".join(f"Dice {n}" for n in class_names) + " | mean Dice | mean NSD (1 mm) |"
    lines = [header, "|---" * (len(class_names) + 3) + "|"]
    for name, arm in results["arms"].items():
        dice, nsd = list(arm["dice"].values()), list(arm["nsd"].values())
        cells = [f"{v:.3f}" for v in dice] + [f"{sum(dice) / len(dice):.3f}", f"{sum(nsd) / len(nsd):.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    write_json_atomic(results, os.path.join(run_dir, "results.json"))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
