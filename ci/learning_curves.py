"""Learning curves of the BTCV bundle against the reference recipe on the same phantoms (issue 46, item 1).

Drives `python -m monai.bundle run training` only, with the bundle's public settings and, for the reference and the
CNN, a small config overlay from `ci/learning_curves/`; the runner makes data and summaries, never trains. The
protocol, fixed before any run:

- data: `ci/phantom_ct.py` seed 0, fov 0.6, 12 labelled phantoms; the bundle keeps the last 4 for validation
  (`val_fraction` 0.34) and trains on the first 8 (the quickstart's 8 training phantoms).
- recipe (`RECIPE`): the quickstart's short-budget settings at 3 x 3 x 4 mm, one 64^3 patch a step, `steps` steps
  (`max_epochs` = steps / 8) with a validation every `val_every` steps. Each validation scores the 4 held-out phantoms
  at the training spacing; the bundle's `training_curves.csv` records mean and per-organ Dice, iteration, seconds.
- arms (`ARMS`): `shipped`, the bundle as shipped; `reference`, the same with every CPU rewrite off, MONAI's own
  attention and float32 (the Model Zoo recipe on a CPU, where its CUDA AMP does nothing); `unet`, a MONAI UNet
  through `network_def`, for context. Further arms are levers: the shipped bundle with one setting changed.
- seeds: the bundle's `seed` (network initialisation, crops, augmentation), the same phantoms for every seed.
- the check: at every validation, the shipped arm's mean over seeds within `TOLERANCE` of the reference arm's.

Seconds are wall-clock inside the training process and include validation; runs that shared the cores with other
work are marked in the record by whoever ran them, and their minutes are not comparable.

    python ci/learning_curves.py --out_dir experiments/learning_curves                 # shipped, reference, unet
    python ci/learning_curves.py --out_dir experiments/learning_curves --arms "['lr_4e-3']" --seeds "[0]"  # a lever
    python ci/learning_curves.py --out_dir experiments/learning_curves --arms "[...]" --train False  # summary only

An interrupted command resumes: a run is done once its curve is copied to `runs/<arm>_seed<k>.csv` (atomically,
at its end); an unfinished run starts again from scratch. `curves.csv` (mean, min and max over seeds per arm and
step, per organ too), `curves.png` (Dice against steps and against minutes) and `check.json` are rewritten from the
finished runs at the end of each.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "ci"))
import phantom_ct  # noqa: E402
from ssl_experiment import bundle_run, settings, write_json_atomic  # noqa: E402

CONFIGS = os.path.join(REPO, "bundles", "swin_unetr_btcv", "configs")
OVERLAYS = os.path.join(REPO, "ci", "learning_curves")
ORGANS = phantom_ct.BTCV_LABELS[1:]
NUM_TRAIN = 8  # training phantoms: steps per epoch with one patch per step
TOLERANCE = 0.03  # the shipped arm's mean over seeds may differ from the reference's by at most this, at every step
RECIPE = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "pixdim": [3.0, 3.0, 4.0],
    "use_checkpoint": False,
    "num_workers": 0,
    "sw_batch_size": 2,
    "num_samples": 1,
    "learning_rate": 0.002,
    "warmup_epochs": 2,
    "val_fraction": 0.34,
}
ARMS = {  # name: (config overlays from ci/learning_curves/, settings changed from RECIPE)
    "shipped": ([], {}),
    "reference": (["reference.json"], {}),
    "unet": (["unet.json"], {}),
    "no_left_right_augmentation": ([], {"augment_left_right": False}),
    "lr_4e-3": ([], {"learning_rate": 0.004}),
    "lr_4e-3_no_left_right_augmentation": ([], {"learning_rate": 0.004, "augment_left_right": False}),
    "lr_8e-3_no_left_right_augmentation": ([], {"learning_rate": 0.008, "augment_left_right": False}),
}


def make_data(out_dir: str) -> str:
    """The phantoms, written once (`dataset.json` is written last, so its presence means the folder is whole)."""
    data = os.path.join(out_dir, "data")
    if not os.path.exists(os.path.join(data, "dataset.json")):
        shutil.rmtree(data, ignore_errors=True)
        phantom_ct.generate(data, num_train=NUM_TRAIN + 4, num_test=0, seed=0, fov_scale=0.6)
    return data


def run_one(out_dir: str, data: str, arm: str, seed: int, steps: int, val_every: int) -> str:
    """Trains one arm with one seed (unless its curve is already there); returns the curve's path."""
    curve = os.path.join(out_dir, "runs", f"{arm}_seed{seed}.csv")
    if os.path.exists(curve):
        return curve
    overlays, changes = ARMS[arm]
    work = os.path.join(out_dir, "work", f"{arm}_seed{seed}")
    shutil.rmtree(work, ignore_errors=True)
    values = dict(RECIPE, **changes)
    values.update(
        dataset_dir=data,
        ckpt_dir=os.path.join(work, "models"),
        output_dir=os.path.join(work, "eval"),
        seed=seed,
        max_epochs=steps // NUM_TRAIN,
        val_interval=val_every // NUM_TRAIN,
    )
    configs = [os.path.join(CONFIGS, "train.json")] + [os.path.join(OVERLAYS, name) for name in overlays]
    bundle_run(["training", "--config_file", str(configs), *settings(**values)], os.path.join(work, "training.log"))
    os.makedirs(os.path.dirname(curve), exist_ok=True)
    shutil.copyfile(os.path.join(work, "eval", "training_curves.csv"), curve + ".partial")
    os.replace(curve + ".partial", curve)
    return curve


def read_curve(path: str) -> list[dict[str, float]]:
    with open(path) as f:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def summarise(out_dir: str, arms: list[str], seeds: list[int]) -> list[dict]:
    """Mean, min and max over the finished seeds of each arm at each validation step (mean Dice and per organ)."""
    rows = []
    for arm in arms:
        curves = [
            read_curve(p) for s in seeds if os.path.exists(p := os.path.join(out_dir, "runs", f"{arm}_seed{s}.csv"))
        ]
        if not curves:
            continue
        for points in zip(*curves):
            row = {"arm": arm, "step": int(points[0]["iteration"]), "seeds": len(points)}
            row["minutes"] = statistics.median(p["seconds"] for p in points) / 60
            for key in ["val_mean_dice", *ORGANS]:
                values = [p[key] for p in points if key in p]
                if values:
                    row[f"{key}"] = statistics.fmean(values)
                    row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
            rows.append(row)
    if rows:
        with open(os.path.join(out_dir, "curves.csv.partial"), "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(os.path.join(out_dir, "curves.csv.partial"), os.path.join(out_dir, "curves.csv"))
    return rows


def check(rows: list[dict], arm: str = "shipped", reference: str = "reference") -> dict:
    """The protocol's check: at every step both arms reached, |mean(arm) - mean(reference)| <= TOLERANCE."""
    ours = {r["step"]: r["val_mean_dice"] for r in rows if r["arm"] == arm}
    theirs = {r["step"]: r["val_mean_dice"] for r in rows if r["arm"] == reference}
    steps = sorted(set(ours) & set(theirs))
    gaps = {step: ours[step] - theirs[step] for step in steps}
    largest = max(gaps.values(), key=abs) if gaps else None
    return {
        "arm": arm,
        "reference": reference,
        "tolerance": TOLERANCE,
        "steps": steps,
        "differences": gaps,
        "largest_difference": largest,
        "within": bool(gaps) and all(abs(g) <= TOLERANCE for g in gaps.values()),
    }


def plot(out_dir: str, rows: list[dict]) -> None:
    """Mean Dice against steps and against minutes, one line per arm (mean over seeds) with its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, sharey=True)
    for arm in dict.fromkeys(r["arm"] for r in rows):
        points = [r for r in rows if r["arm"] == arm]
        mean = [r["val_mean_dice"] for r in points]
        low = [r["val_mean_dice_min"] for r in points]
        high = [r["val_mean_dice_max"] for r in points]
        for ax, x in zip(axes, ([r["step"] for r in points], [r["minutes"] for r in points])):
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=f"{arm} ({points[0]['seeds']} seeds)")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("training steps (one 64³ patch each)")
    axes[1].set_xlabel("minutes of training (median over seeds, validation included)")
    axes[0].set_ylabel("held-out mean Dice, 13 organs")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    axes[0].legend(loc="upper left")
    fig.suptitle("BTCV bundle on 8 training phantoms, 4 held out (3 × 3 × 4 mm): mean and min–max over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png.partial"), format="png")
    plt.close(fig)
    os.replace(os.path.join(out_dir, "curves.png.partial"), os.path.join(out_dir, "curves.png"))


def main(
    out_dir: str = "experiments/learning_curves",
    arms: tuple[str, ...] = ("shipped", "reference", "unet"),
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = 384,
    val_every: int = 32,
    train: bool = True,
) -> dict:
    """Runs every arm for every seed (seed-major, so that each arm has its first seed early), then summarises;
    `train` False only summarises the runs already finished (e.g. levers run with one seed beside the base arms)."""
    if steps % NUM_TRAIN or val_every % NUM_TRAIN:
        raise ValueError(f"steps and val_every must be multiples of {NUM_TRAIN} (one epoch), got {steps}, {val_every}.")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"arms {unknown} are not among {sorted(ARMS)}.")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = make_data(out_dir) if train else None
    result = {}
    for seed in seeds:
        for arm in arms:
            if train:
                run_one(out_dir, data, arm, seed, steps, val_every)
            elif not os.path.exists(os.path.join(out_dir, "runs", f"{arm}_seed{seed}.csv")):
                continue
            rows = summarise(out_dir, list(arms), list(seeds))
            plot(out_dir, rows)
            if "shipped" in arms and "reference" in arms:
                result = check(rows)
                write_json_atomic(result, os.path.join(out_dir, "check.json"))
            last = [r for r in rows if r["arm"] == arm][-1]
            print(f"{arm} seed {seed}: step {last['step']} mean Dice {last['val_mean_dice']:.3f} "
                  f"({last['seeds']} seeds so far), {last['minutes']:.1f} min", flush=True)  # fmt: skip
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main)
