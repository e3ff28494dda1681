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
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "bundles", "swin_unetr_msd", "configs")
TASK = "Task03_Liver"
TASK_FILE = os.path.join(CONFIGS, "tasks", f"{TASK}.json")
SHORT_BUDGET = {
    "feature_size": "12",
    "roi_size": "[64,64,64]",
    "use_checkpoint": "False",
    "num_samples": "1",
    "num_workers": "2",
    "sw_batch_size": "2",
}
ARMS = {  # name: (extra config files, extra settings)
    "single model (fold 0)": ([], {"ckpt_dir": "{models}/fold0"}),
    "mirroring TTA": ([], {"ckpt_dir": "{models}/fold0", "tta": "True"}),
    "5-fold ensemble": (["inference_ensemble.json"], {"ckpt_dir": "{models}"}),
    "ensemble + TTA": (["inference_ensemble.json"], {"ckpt_dir": "{models}", "tta": "True"}),
}


def bundle_run(config_files: list[str], settings: dict[str, str], log_path: str, workflow: str = "run") -> float:
    """Runs one bundle workflow with `settings` into `log_path`; returns its wall time in seconds."""
    files = [os.path.join(CONFIGS, name) for name in config_files] + [TASK_FILE]
    command = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(files)]
    for key, value in settings.items():
        command += [f"--{key}", value]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"bundle run failed (exit {proc.returncode}): see {log_path}")
    return time.perf_counter() - start


def per_class(output_dir: str, metric: str) -> list[float]:
    """Mean over the scored cases of each class, from MetricsSaver's `<metric>_summary.csv`."""
    with open(os.path.join(output_dir, f"{metric}_summary.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["class"].startswith("class")]
    return [float(row["mean"]) for row in rows]


def main(run_dir: str = "experiments/msd_tta_ensemble", max_epochs: int = 15, num_folds: int = 5) -> dict:
    """Generates the data, trains the folds, scores the four arms; prints a markdown table and writes
    `<run_dir>/results.json`."""
    sys.path.insert(0, os.path.join(REPO, "ci"))
    from synthetic_msd import generate_task

    run_dir = os.path.abspath(run_dir)
    train_dir, heldout_dir, models = (os.path.join(run_dir, name) for name in ("train_data", "heldout", "models"))
    if not os.path.isfile(os.path.join(train_dir, "dataset.json")):
        generate_task(train_dir, TASK, num_train=10, num_test=0, seed=0)
    heldout_list = os.path.join(heldout_dir, "heldout.json")
    if not os.path.isfile(heldout_list):
        generate_task(heldout_dir, TASK, num_train=4, num_test=0, seed=1)
        with open(os.path.join(heldout_dir, "dataset.json")) as f:
            cases = json.load(f)["training"]
        with open(heldout_list, "w") as f:
            json.dump({"training": cases, "validation": cases}, f, indent=1)
    results: dict = {"task": TASK, "max_epochs": max_epochs, "train_s": {}, "arms": {}}
    for fold in range(num_folds):
        fold_dir = os.path.join(models, f"fold{fold}")
        if os.path.isfile(os.path.join(fold_dir, "model.pt")):
            continue
        os.makedirs(fold_dir, exist_ok=True)
        settings = dict(SHORT_BUDGET, dataset_dir=train_dir, fold=str(fold), ckpt_dir=fold_dir)
        settings.update(output_dir=os.path.join(fold_dir, "eval"), max_epochs=str(max_epochs))
        settings.update(val_interval=str(max_epochs), warmup_epochs="2", learning_rate="0.002")
        log = os.path.join(fold_dir, "training.log")
        results["train_s"][fold] = bundle_run(["train.json"], settings, log, workflow="training")
        print(f"fold {fold} trained in {results['train_s'][fold]:.0f} s", flush=True)
    with open(TASK_FILE) as f:
        class_names = [name for key, name in sorted(json.load(f)["labels"].items()) if key != "0"]
    for slug, (name, (extra_files, extra)) in zip(("single", "tta", "ensemble", "both"), ARMS.items()):
        output_dir = os.path.join(run_dir, "scores", slug)
        os.makedirs(output_dir, exist_ok=True)
        settings = dict(SHORT_BUDGET, dataset_dir=heldout_dir, datalist=heldout_list, output_dir=output_dir)
        settings.update({key: value.format(models=models) for key, value in extra.items()})
        seconds = bundle_run(["train.json", "evaluate.json"] + extra_files, settings, output_dir + ".log")
        dice, nsd = per_class(output_dir, "val_mean_dice"), per_class(output_dir, "val_nsd")
        results["arms"][name] = {"dice": dict(zip(class_names, dice)), "nsd": dict(zip(class_names, nsd)), "s": seconds}
        print(f"{name} scored in {seconds:.0f} s", flush=True)
    header = "| arm | " + " | ".join(f"Dice {n}" for n in class_names) + " | mean Dice | mean NSD (1 mm) |"
    lines = [header, "|---" * (len(class_names) + 3) + "|"]
    for name, arm in results["arms"].items():
        dice = list(arm["dice"].values())
        cells = [f"{v:.3f}" for v in dice] + [f"{sum(dice) / len(dice):.3f}"]
        cells.append(f"{sum(arm['nsd'].values()) / len(arm['nsd']):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    import fire

    fire.Fire(main)
