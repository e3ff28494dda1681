"""Does self-supervised pre-training help fine-tuning? The protocol of `docs/ssl_experiment.md`, run end to end.

Drives only `python -m monai.bundle run` with the bundles' public settings; the runner itself makes data, the
control encoder (the pre-trained one with each tensor's values shuffled) and the summary, never trains.

    python ci/ssl_experiment.py --preset cpu --out_dir experiments/ssl_cpu     # the CPU experiment (2 cores)
    python ci/ssl_experiment.py --preset gpu --out_dir experiments/ssl_gpu     # paper-sized, for a GPU
    python ci/ssl_experiment.py --preset tiny --out_dir /tmp/ssl_tiny          # plumbing check (the test suite's)

Stopped at any point, the same command resumes: finished steps (data, pre-training, each fine-tuning run with its
test evaluation) are recognised by the result files they write last, atomically; an unfinished step starts again.

Writes into `out_dir`: `gates.json` (the protocol's two gates, each term beside its level and whether it passed;
while either fails the experiment is "not powered" and draws no comparison),
`results.csv` (one row per arm x labelled cases x seed: mean and per-organ test Dice),
`summary.csv` (per arm and labelled cases: mean, spread, paired differences by seed, and the protocol's call),
`data/hardness.json` (the phantoms' HU-lookup Dice and crop overlap, `phantom_ct.hardness`),
`dice_vs_labelled_cases.png`, `pretraining_curves.png` (the pre-training bundle's loss and validation curves),
`pretraining_terms.png` (its three proxy-task losses, read from its log), and
`logs/` with every bundle run's output.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "ci"))
import phantom_ct  # noqa: E402

ARMS = ("scratch", "pretrained", "shuffled")
ORGANS = phantom_ct.BTCV_LABELS[1:]
# The protocol's call: a mean paired difference of at least this much Dice, of the same sign for every seed.
EFFECT_THRESHOLD = 0.02
# The gates (docs/ssl_experiment.md), fixed before any run. Pre-training on held-out phantoms: the contrastive loss
# and the reconstruction L1 at most this share of their chance level / blurred-input baseline, and rotation accuracy
# above 1/4 with a one-sided binomial p-value below GATE_P. Fine-tuning: the scratch arm's mean test Dice at the
# largest labelled count at least GATE_DICE.
GATE_SHARE = 0.9
GATE_P = 0.05
GATE_DICE = 0.5
NOT_POWERED = "not powered"


@dataclass(frozen=True)
class Preset:
    """One size of the experiment; every field is either data or a public setting of the bundles."""

    fov_scale: float  # phantom size (phantom_ct.make_phantom)
    num_unlabelled: int  # pre-training volumes (one more is its validation volume)
    num_val: int  # fine-tuning validation cases (choose model.pt), the same in every run
    num_test: int  # held-out test cases, scored once per run and used for nothing else
    label_counts: tuple[int, ...]  # labelled training cases per run (num_train_cases: the first N)
    seeds: tuple[int, ...]  # fine-tuning seeds (seed); pre-training runs once with seed 0
    feature_size: int
    roi_size: int
    pretrain_epochs: int  # pre-training steps = pretrain_epochs * ceil(num_unlabelled / pretrain_batch)
    pretrain_batch: int
    pretrain_val_every: int  # pre-training iterations between validations (model_swinvit.pt at the best L1)
    finetune_steps: int  # optimizer steps per fine-tuning run, the same for every arm and labelled count
    finetune_val_every: int  # fine-tuning steps between validations (model.pt at the best validation Dice)
    gate_batch: int = 1  # held-out CTs per batch of the pre-training gate (divides num_test: every batch the same B)
    gate_samples: int = 2  # sub-volumes per held-out CT in the pre-training gate (B = gate_batch * gate_samples)
    num_samples: int = 2  # patches per labelled case and step (fine-tuning), sub-volumes per CT (pre-training)
    pretrain_samples: int | None = None  # sub-volumes per CT in pre-training, if not num_samples
    contrast_queue_size: int = 0  # pre-training's contrast_queue_size: earlier projections as extra negatives
    pixdim: tuple[float, float, float] | None = None  # both bundles' resampling spacing (None: the paper's)
    pretrain_lr: float = 4e-4
    finetune_lr: float = 1e-4
    warmup_fraction: float = 0.1
    extra: dict = field(default_factory=dict)  # further public settings for every run (e.g. use_checkpoint)
    runs_unpowered: bool = False  # make the comparison runs even when a gate failed (the plumbing check's)


PRESETS = {
    "tiny": Preset(
        fov_scale=0.45, num_unlabelled=2, num_val=1, num_test=1, label_counts=(1,), seeds=(0,), feature_size=12,
        roi_size=64, pretrain_epochs=2, pretrain_batch=2, pretrain_val_every=2, finetune_steps=2,
        finetune_val_every=2, gate_batch=1, gate_samples=2, num_samples=1, contrast_queue_size=4,
        pixdim=(3.0, 3.0, 4.0), extra={"use_checkpoint": False, "num_workers": 0, "sw_batch_size": 2},
        runs_unpowered=True,
    ),
    "cpu": Preset(
        fov_scale=0.6, num_unlabelled=48, num_val=2, num_test=6, label_counts=(2, 8), seeds=(0, 1, 2),
        feature_size=12, roi_size=64, pretrain_epochs=8, pretrain_batch=4, pretrain_val_every=24,
        finetune_steps=224, finetune_val_every=112, gate_batch=6, gate_samples=1, num_samples=1,
        pretrain_samples=1, contrast_queue_size=32, pixdim=(3.0, 3.0, 4.0), pretrain_lr=1e-3, finetune_lr=2e-3,
        extra={"use_checkpoint": False, "num_workers": 2, "sw_batch_size": 2},
    ),
    "gpu": Preset(
        fov_scale=1.0, num_unlabelled=200, num_val=4, num_test=12, label_counts=(2, 4, 8, 16), seeds=(0, 1, 2),
        feature_size=48, roi_size=96, pretrain_epochs=100, pretrain_batch=4, pretrain_val_every=500,
        finetune_steps=3000, finetune_val_every=250, gate_batch=4, gate_samples=4, num_samples=4,
        extra={"num_workers": 8},
    ),
}  # fmt: skip


def write_json_atomic(obj: object, path: str) -> None:
    """Writes `obj` as JSON to `path` through a temporary file in the same folder, so it is complete or absent."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def bundle_run(args: list[str], log_path: str) -> None:
    """`python -m monai.bundle run ARGS`, output to `log_path`; a failure raises with the log's tail."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        command = [sys.executable, "-m", "monai.bundle", "run", *args]
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if status.returncode:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-25:])
        raise RuntimeError(f"{tail}\nbundle run failed (exit {status.returncode}); full log: {log_path}")


def spacing(preset: Preset) -> dict:
    """The preset's `pixdim` setting for both bundles, or nothing for their default (the paper's spacing)."""
    return {"pixdim": list(preset.pixdim)} if preset.pixdim else {}


def settings(**values: object) -> list[str]:
    """`--key value` pairs as `monai.bundle run` parses them (Python literals)."""
    pairs = [(f"--{key}", value if isinstance(value, str) else repr(value)) for key, value in values.items()]
    return [item for pair in pairs for item in pair]


def prepare_data(out_dir: str, preset: Preset) -> dict[str, str]:
    """Phantoms and the datalists of every stage; returns their paths. Labelled, test and pre-training phantoms
    are different patients (seeds 1 and 2)."""
    data = os.path.join(out_dir, "data")
    lists = {name: os.path.join(data, f"{name}.json") for name in ("finetune", "test", "pretrain")}
    if all(os.path.isfile(p) for p in lists.values()):
        return lists
    shutil.rmtree(data, ignore_errors=True)
    labelled = phantom_ct.generate(
        os.path.join(data, "labelled"), max(preset.label_counts) + preset.num_val, preset.num_test, 1, preset.fov_scale
    )
    unlabelled = os.path.join(data, "unlabelled")
    phantom_ct.generate(unlabelled, preset.num_unlabelled + 1, 0, 2, preset.fov_scale)
    with open(os.path.join(labelled, "dataset.json")) as f:
        cases = json.load(f)
    absolute = lambda items: [{k: os.path.join(labelled, v) for k, v in c.items()} for c in items]  # noqa: E731
    pool = absolute(cases["training"])
    test = absolute(cases["test"])
    num_train = max(preset.label_counts)
    write_json_atomic({"training": pool[:num_train], "validation": pool[num_train:]}, lists["finetune"])
    write_json_atomic({"training": test, "validation": test}, lists["test"])
    with open(os.path.join(unlabelled, "dataset.json")) as f:
        images = [{"image": os.path.join(unlabelled, c["image"])} for c in json.load(f)["training"]]
    # How hard this data set is (the HU-lookup Dice fitted on the labelled pool, scored on the test cases).
    write_json_atomic(phantom_ct.hardness(labelled, roi=preset.roi_size), os.path.join(data, "hardness.json"))
    write_json_atomic({"training": images[:-1], "validation": images[-1:]}, lists["pretrain"])
    return lists


def pretrain(out_dir: str, preset: Preset, datalist: str) -> str:
    """Runs the pre-training bundle once; returns the path of its `model_swinvit.pt`."""
    run_dir = os.path.join(out_dir, "pretrain")
    encoder = os.path.join(run_dir, "models", "model_swinvit.pt")
    done = os.path.join(run_dir, "done.json")
    if os.path.isfile(done):
        return encoder
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = preset.pretrain_epochs * -(-preset.num_unlabelled // preset.pretrain_batch)
    config = os.path.join(REPO, "bundles", "swin_unetr_pretrain", "configs", "train.json")
    bundle_run(
        ["training", "--config_file", config]
        + settings(
            dataset_dir=os.path.dirname(datalist),
            datalist=datalist,
            ckpt_dir=os.path.join(run_dir, "models"),
            output_dir=os.path.join(run_dir, "eval"),
            feature_size=preset.feature_size,
            roi_size=[preset.roi_size] * 3,
            batch_size=preset.pretrain_batch,
            num_samples=preset.pretrain_samples or preset.num_samples,
            contrast_queue_size=preset.contrast_queue_size,
            max_epochs=preset.pretrain_epochs,
            val_interval=preset.pretrain_val_every,
            warmup_steps=max(1, int(preset.warmup_fraction * steps)),
            learning_rate=preset.pretrain_lr,
            cache_rate=1.0,
            seed=0,
            **spacing(preset),
            **{k: v for k, v in preset.extra.items() if k != "sw_batch_size"},
        ),  # fmt: skip
        os.path.join(out_dir, "logs", "pretrain.log"),
    )
    curves = os.path.join(run_dir, "eval", "training_curves.png")
    if os.path.isfile(curves):
        shutil.copyfile(curves, os.path.join(out_dir, "pretraining_curves.png"))
    write_json_atomic({"steps": steps, "encoder": encoder}, done)
    return encoder


def binomial_p_value(correct: int, total: int, chance: float) -> float:
    """One-sided p-value of `correct` or more successes in `total` trials that each succeed with `chance`."""
    return float(sum(math.comb(total, k) * chance**k * (1 - chance) ** (total - k) for k in range(correct, total + 1)))


def pretraining_gate(metrics: dict[str, float], rotation_predictions: int) -> dict:
    """Gate (a) of the protocol from the pre-training bundle's metrics on held-out phantoms: each proxy task against
    the level that means nothing was learned. Returns each term's value, level, passed, and `passed` for all three.

    Args:
        metrics: `val_contrast`, `val_contrast_chance`, `val_rotation_accuracy`, `val_l1`, `val_l1_blurred_input`.
        rotation_predictions: how many views the rotation accuracy was measured on.
    """
    correct = round(metrics["val_rotation_accuracy"] * rotation_predictions)
    p_value = binomial_p_value(correct, rotation_predictions, 0.25)
    chance = metrics["val_contrast_chance"]
    terms = {
        "contrastive": {"value": metrics["val_contrast"], "level": chance, "rule": f"<= {GATE_SHARE} x ln(2B - 1)",
                        "passed": chance > 0 and metrics["val_contrast"] <= GATE_SHARE * chance},
        "rotation": {"value": metrics["val_rotation_accuracy"], "level": 0.25, "views": rotation_predictions,
                     "p_value": p_value, "rule": f"one-sided binomial p < {GATE_P} against 1/4",
                     "passed": p_value < GATE_P},
        "inpainting": {"value": metrics["val_l1"], "level": metrics["val_l1_blurred_input"],
                       "rule": f"<= {GATE_SHARE} x L1 of the blurred input",
                       "passed": metrics["val_l1"] <= GATE_SHARE * metrics["val_l1_blurred_input"]},
    }  # fmt: skip
    return {"terms": terms, "passed": all(term["passed"] for term in terms.values())}


def finetuning_gate(results: list[dict], largest: int) -> dict:
    """Gate (b) of the protocol: the scratch arm's mean test Dice over seeds at the largest labelled count.

    Args:
        results: the fine-tuning runs' result rows.
        largest: the preset's largest labelled count.
    """
    scores = [r["mean_dice"] for r in results if r["arm"] == "scratch" and r["labelled_cases"] == largest]
    value = float(np.mean(scores)) if scores else float("nan")
    passed = bool(scores) and value >= GATE_DICE
    return {"value": value, "level": GATE_DICE, "labelled_cases": largest, "seeds": len(scores),
            "rule": f"scratch mean test Dice >= {GATE_DICE}", "passed": passed}  # fmt: skip


def measure_pretraining_gate(out_dir: str, preset: Preset, test_list: str) -> dict:
    """Runs the pre-training bundle's `evaluate.json` (its `model.pt`) on the held-out test phantoms, which neither
    bundle trains or validates on, in batches of `gate_batch` CTs x `gate_samples` sub-volumes; returns gate (a).

    Args:
        out_dir: the experiment's folder (pre-training done).
        preset: the experiment's size.
        test_list: the test datalist (its images are used, not its labels).
    """
    if preset.num_test % preset.gate_batch:
        raise ValueError(f"gate_batch {preset.gate_batch} must divide num_test {preset.num_test}.")
    run_dir = os.path.join(out_dir, "pretrain", "gate")
    done = os.path.join(run_dir, "gate.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    with open(test_list) as f:
        images = [{"image": case["image"]} for case in json.load(f)["validation"]]
    datalist = os.path.join(run_dir, "held_out.json")
    write_json_atomic({"training": images, "validation": images}, datalist)
    configs = os.path.join(REPO, "bundles", "swin_unetr_pretrain", "configs")
    bundle_run(
        ["--config_file", str([os.path.join(configs, "train.json"), os.path.join(configs, "evaluate.json")])]
        + settings(
            dataset_dir=run_dir,
            datalist=datalist,
            ckpt_dir=os.path.join(out_dir, "pretrain", "models"),
            output_dir=os.path.join(run_dir, "eval"),
            feature_size=preset.feature_size,
            roi_size=[preset.roi_size] * 3,
            batch_size=preset.gate_batch,
            num_samples=preset.gate_samples,
            seed=0,
            **spacing(preset),
            **{k: v for k, v in preset.extra.items() if k != "sw_batch_size"},
        ),  # fmt: skip
        os.path.join(out_dir, "logs", "pretrain_gate.log"),
    )
    with open(os.path.join(run_dir, "eval", "metrics.csv")) as f:
        metrics = {name: float(value) for name, value in csv.reader(f)}
    gate = pretraining_gate(metrics, rotation_predictions=2 * preset.num_test * preset.gate_samples)
    write_json_atomic(gate, done)
    return gate


def plot_pretraining_terms(
    out_dir: str, sub_volumes: int, blurred_l1: float | None = None, queue_size: int = 0
) -> None:
    """`pretraining_terms.png`: the three proxy-task losses per iteration, read from the pre-training bundle's log,
    each beside the level of a network that learned nothing.

    Args:
        out_dir: the experiment's folder.
        sub_volumes: sub-volumes per training step (B: the contrastive chance line is ln(2B - 1 + K)).
        blurred_l1: the blurred-input baseline's L1 on the held-out phantoms (gate (a)), drawn on the L1 panel.
        queue_size: the pre-training's `contrast_queue_size` K (its queued negatives once the queue is full).
    """
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pattern = re.compile(r"contrast: ([0-9.]+) inpaint: ([0-9.]+) rotation: ([0-9.]+) total: ([0-9.]+)")
    with open(os.path.join(out_dir, "logs", "pretrain.log")) as log:
        terms = np.array([[float(v) for v in m.groups()] for m in map(pattern.search, log) if m])
    if not len(terms):
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    chance = {
        "contrastive (NT-Xent)": (
            np.log(2 * sub_volumes - 1 + queue_size),
            f"chance, ln(2B - 1 + K), B = {sub_volumes}, K = {queue_size}",
        ),
        "inpainting (L1)": (blurred_l1, "blurred input (held-out)"),
        "rotation (cross-entropy)": (np.log(4), "chance (4 rotations)"),
    }
    for ax, (name, (level, label)), values in zip(axes, chance.items(), terms[:, :3].T):
        ax.plot(np.arange(1, len(values) + 1), values, lw=0.8)
        if level is not None:
            ax.axhline(level, color="grey", ls="--", lw=0.8, label=label)
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("iteration")
    fig.suptitle("Pre-training loss terms")
    fig.tight_layout()
    tmp = os.path.join(out_dir, "pretraining_terms.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "pretraining_terms.png"))


def shuffled_encoder(encoder: str) -> str:
    """The control arm's encoder: each tensor of `encoder` with its values randomly permuted (same per-tensor
    statistics, no learned structure); written once beside it."""
    import torch

    path = encoder.replace("model_swinvit.pt", "model_swinvit_shuffled.pt")
    if os.path.isfile(path):
        return path
    checkpoint = torch.load(encoder, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    generator = torch.Generator().manual_seed(0)
    shuffled = {}
    for key, tensor in state.items():
        if torch.is_floating_point(tensor):
            order = torch.randperm(tensor.numel(), generator=generator)
            tensor = tensor.flatten()[order].reshape(tensor.shape)
        shuffled[key] = tensor
    tmp = f"{path}.partial"
    torch.save({"state_dict": shuffled} if "state_dict" in checkpoint else shuffled, tmp)
    os.replace(tmp, path)
    return path


def finetune(out_dir: str, preset: Preset, lists: dict, arm: str, cases: int, seed: int, encoders: dict) -> dict:
    """One fine-tuning run of the BTCV bundle and its evaluation on the test cases; returns its result row.

    Args:
        out_dir: the experiment's folder.
        preset: the experiment's size.
        lists: datalist paths from `prepare_data`.
        arm: "scratch", "pretrained" or "shuffled".
        cases: labelled training cases (`num_train_cases`).
        seed: the run's `seed`.
        encoders: encoder file per arm that starts from one.
    """
    name = f"{arm}_n{cases}_s{seed}"
    run_dir = os.path.join(out_dir, "runs", name)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    shutil.rmtree(run_dir, ignore_errors=True)
    configs = os.path.join(REPO, "bundles", "swin_unetr_btcv", "configs")
    steps_per_epoch = cases * 1  # batch_size 1: one step per labelled case
    common = dict(
        dataset_dir=os.path.dirname(lists["finetune"]), ckpt_dir=os.path.join(run_dir, "models"),
        feature_size=preset.feature_size, roi_size=[preset.roi_size] * 3, **spacing(preset), **preset.extra,
    )  # fmt: skip
    bundle_run(
        ["training", "--config_file", os.path.join(configs, "train.json")]
        + settings(
            datalist=lists["finetune"],
            output_dir=os.path.join(run_dir, "eval"),
            num_train_cases=cases,
            batch_size=1,
            num_samples=preset.num_samples,
            max_epochs=max(1, preset.finetune_steps // steps_per_epoch),
            val_interval=max(1, preset.finetune_val_every // steps_per_epoch),
            warmup_epochs=max(1, int(preset.warmup_fraction * preset.finetune_steps) // steps_per_epoch),
            learning_rate=preset.finetune_lr,
            cache_rate=1.0,
            seed=seed,
            use_pretrained=arm != "scratch",
            pretrained_path=encoders.get(arm, encoders["pretrained"]),
            **common,
        ),  # fmt: skip
        os.path.join(out_dir, "logs", f"{name}_train.log"),
    )
    test_dir = os.path.join(run_dir, "test")
    bundle_run(
        ["--config_file", str([os.path.join(configs, "train.json"), os.path.join(configs, "evaluate.json")])]
        + settings(datalist=lists["test"], output_dir=test_dir, **common),
        os.path.join(out_dir, "logs", f"{name}_test.log"),
    )
    with open(os.path.join(test_dir, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.DictReader(f))
    per_organ = {organ: float(np.nanmean([float(r[f"class{i}"]) for r in rows])) for i, organ in enumerate(ORGANS)}
    mean_dice = float(np.nanmean(list(per_organ.values())))
    result = {"arm": arm, "labelled_cases": cases, "seed": seed, "mean_dice": mean_dice, **per_organ}
    write_json_atomic(result, result_path)
    return result


def finetune_and_report(out_dir: str, preset: Preset, lists: dict, run: tuple, encoders: dict) -> dict:
    """`finetune` of one (arm, labelled cases, seed) run, its test Dice printed; returns its result row."""
    arm, cases, seed = run
    result = finetune(out_dir, preset, lists, arm, cases, seed, encoders)
    print(f"{arm:>10} n={cases} seed={seed}: test mean Dice {result['mean_dice']:.4f}", flush=True)
    return result


def call(differences: list[float]) -> str:
    """The protocol's rule for one comparison of paired differences (one per seed)."""
    mean = float(np.mean(differences))
    if mean >= EFFECT_THRESHOLD and all(d > 0 for d in differences):
        return "better"
    if mean <= -EFFECT_THRESHOLD and all(d < 0 for d in differences):
        return "worse"
    return "no clear difference"


def summarise(out_dir: str, results: list[dict], powered: bool = True) -> list[dict]:
    """Writes results.csv, summary.csv and the picture from the finished runs' `results`; returns the summary rows.
    Each comparison pairs the seeds that both arms have finished (all of them once the experiment is complete).
    Unless `powered` (both gates passed), no comparison is drawn: the calls read "not powered", with no differences.
    """
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    by_key = {(r["arm"], r["labelled_cases"], r["seed"]): r["mean_dice"] for r in results}
    counts = sorted({r["labelled_cases"] for r in results})
    summary = []
    for cases in counts:
        for arm in ARMS:
            seeds = sorted(s for (a, n, s) in by_key if a == arm and n == cases)  # all, unless summarised early
            if not seeds:
                continue
            scores = [by_key[(arm, cases, s)] for s in seeds]
            row = {"arm": arm, "labelled_cases": cases, "mean_dice": float(np.mean(scores)),
                   "std_dice": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                   "min_dice": min(scores), "max_dice": max(scores), "seeds": len(seeds)}  # fmt: skip
            if arm != "scratch":
                for other in ("scratch",) + (("shuffled",) if arm == "pretrained" else ()):
                    paired = [s for s in seeds if (other, cases, s) in by_key]
                    diffs = [by_key[(arm, cases, s)] - by_key[(other, cases, s)] for s in paired]
                    row[f"minus_{other}"] = " ".join(f"{d:+.4f}" for d in diffs) if powered else ""
                    row[f"vs_{other}"] = (call(diffs) if diffs else "") if powered else NOT_POWERED
            summary.append(row)
    fields = ["arm", "labelled_cases", "seeds", "mean_dice", "std_dice", "min_dice", "max_dice",
              "minus_scratch", "vs_scratch", "minus_shuffled", "vs_shuffled"]  # fmt: skip
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)
    plot(out_dir, summary, counts, powered)
    return summary


def plot(out_dir: str, summary: list[dict], counts: list[int], powered: bool = True) -> None:
    """Mean test Dice against labelled cases, one line per arm, bars spanning the seeds' min to max; the title says
    when the experiment is not powered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, arm in zip((-0.06, 0.0, 0.06), ARMS):
        rows = [r for r in summary if r["arm"] == arm]
        if not rows:
            continue
        x = np.array([r["labelled_cases"] for r in rows], float) * (1 + offset)
        y = np.array([r["mean_dice"] for r in rows])
        below, above = [r["mean_dice"] - r["min_dice"] for r in rows], [r["max_dice"] - r["mean_dice"] for r in rows]
        spread = np.array([below, above])
        ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the labelled-case counts as ticks, not 3x10^0, 4x10^0
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.axhline(GATE_DICE, color="grey", linestyle="--", linewidth=0.8, label=f"gate (b): scratch at N = {max(counts)}")
    ax.set_ylim(0.0, 1.0)  # Dice's whole range, so that the distance to the gate shows
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("mean test Dice over 13 organs")
    note = "mean over seeds, bars: min to max" + ("" if powered else "\nNOT POWERED: a gate failed, no comparison")
    ax.set_title(f"Fine-tuning from scratch, pre-trained and shuffled encoders\n{note}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(out_dir, "dice_vs_labelled_cases.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "dice_vs_labelled_cases.png"))


def main(preset: str = "cpu", out_dir: str = "experiments/ssl_cpu") -> None:
    """Runs (or resumes) the experiment with `preset` ("tiny", "cpu" or "gpu") into `out_dir`; prints the summary.

    Args:
        preset: "tiny" (a plumbing check), "cpu" (sized for a 2-core CPU) or "gpu" (paper-sized).
        out_dir: where everything goes; an existing one is resumed.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    chosen = PRESETS[preset]
    out_dir = os.path.abspath(out_dir)  # the datalists hold absolute paths, valid from any working folder
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic({"preset": preset, **asdict(chosen)}, os.path.join(out_dir, "preset.json"))
    lists = prepare_data(out_dir, chosen)
    print(f"data ready: {os.path.join(out_dir, 'data')}", flush=True)
    encoder = pretrain(out_dir, chosen, lists["pretrain"])
    print(f"pre-training done: {encoder}", flush=True)
    pretraining = measure_pretraining_gate(out_dir, chosen, lists["test"])
    sub_volumes = chosen.pretrain_batch * (chosen.pretrain_samples or chosen.num_samples)
    plot_pretraining_terms(out_dir, sub_volumes, pretraining["terms"]["inpainting"]["level"],
                           chosen.contrast_queue_size)  # fmt: skip
    for name, term in pretraining["terms"].items():
        print(f"gate (a) {name}: {term['value']:.4f} against {term['level']:.4f} ({term['rule']}): "
              f"{'passed' if term['passed'] else 'FAILED'}", flush=True)  # fmt: skip
    encoders = {"pretrained": encoder, "shuffled": shuffled_encoder(encoder)}
    largest = max(chosen.label_counts)
    # Gate (b) first: the scratch runs at the largest labelled count. The other runs are made only once both
    # gates have passed, since a comparison that the protocol would not draw is not worth their hours.
    gate_runs = [("scratch", largest, seed) for seed in chosen.seeds]
    results = [finetune_and_report(out_dir, chosen, lists, run, encoders) for run in gate_runs]
    finetuning = finetuning_gate(results, largest)
    gates = {
        "pretraining": pretraining,
        "finetuning": finetuning,
        "powered": pretraining["passed"] and finetuning["passed"],
    }
    write_json_atomic(gates, os.path.join(out_dir, "gates.json"))
    print(f"gate (b) scratch at n={finetuning['labelled_cases']}: {finetuning['value']:.4f} ({finetuning['rule']}): "
          f"{'passed' if finetuning['passed'] else 'FAILED'}", flush=True)  # fmt: skip
    if gates["powered"] or chosen.runs_unpowered:
        for run in [(arm, n, seed) for n in chosen.label_counts for seed in chosen.seeds for arm in ARMS]:
            if run not in gate_runs:
                results.append(finetune_and_report(out_dir, chosen, lists, run, encoders))
    if not gates["powered"]:
        made = "made for the plumbing check only" if chosen.runs_unpowered else "not made"
        print(f"{NOT_POWERED}: a gate failed, so no comparison is drawn; its runs are {made} (gates.json)", flush=True)
    summary = summarise(out_dir, results, powered=gates["powered"])
    for row in summary:
        calls = ", ".join(f"{k}: {row[k]} ({row['minus_' + k[3:]]})" for k in ("vs_scratch", "vs_shuffled") if k in row)
        print(f"{row['arm']:>10} n={row['labelled_cases']}: {row['mean_dice']:.4f} +- {row['std_dice']:.4f}  {calls}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
