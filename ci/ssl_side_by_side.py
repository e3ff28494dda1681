"""Pre-training side by side with the authors' released code, to find what collapses the encoder (issue 47, item 1).

The released code is `SwinUNETR/Pretrain` in Project-MONAI's `research-contributions` repository on GitHub; it is not
part of this project. Clone it anywhere and pass the clone's folder:

    python ci/ssl_side_by_side.py --released /path/to/research-contributions --out_dir experiments/ssl_side_by_side

Every arm trains from the same initial weights on the same sub-volumes, step for step, and logs each step's three
loss terms, and every `spread_every` steps the per-stage spread of its encoder on held-out views
(`encoder_collapse.stage_spreads`: 0 when a stage gives every input the same output).

- data: the powered CPU preset of `ci/ssl_experiment.py` (its `prepare_data`: 48 unlabelled phantoms to train on,
  6 held-out test phantoms and their 90-degree turns as the 12 views the spread is measured on);
- schedule: the preset's 96 steps of 4 CTs x one 64^3 sub-volume, AdamW, weight decay 1e-5, warm-up over 10 % of the
  steps, then cosine; every arm draws the same CTs and the same crops (`batch_checksum` in the log shows it);
- initial weights: the bundle's SSLHead built with seed 0; the released SSLHead gets every tensor of the same shape
  (its decoder's last two convolutions are narrower in the bundle: 12 -> 6 -> 1 channels against 12 -> 12 -> 1 at
  feature size 12, so those two keep their own seed-0 initialisation; the record lists them).

Arms (`ARMS`): `released`, the checkout's `SSLHead`, `Loss`, `rot_rand`, `aug_rand` and `WarmupCosineSchedule` in
float32 (its AMP is CUDA's, which does nothing on a CPU); every other arm is the bundle with the preset's settings
and the arm's changes, public settings only.

Why this script has a training loop (rule 1 keeps loops out of the product): the released code is itself a loop
(`main.py`, CUDA-only, reading its own data lists), and arms that must see the same sub-volumes from the same weights
are easiest to hold in step here. A bundle arm's step is the bundle's own pieces, parsed from its train config with the
arm's settings and called as MONAI's `SupervisedTrainer` calls them: the view transforms, `SSLPrepareBatch`, the
`AutocastInferer` (bfloat16 where the CPU has it, as `amp` does), `SSLLoss`, gradient clipping where
`GradientClipHandler` clips, AdamW and the warm-up cosine schedule.

Writes `<out_dir>/arms/<arm>.csv` (one row per step; an arm whose CSV exists is not run again, so an interrupted
command resumes at the next arm), `summary.json`, `side_by_side.md` (the table) and `side_by_side.png` (the three
terms and the bottleneck's spread against steps).
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import math
import os
import sys
import types

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "ci"))
import encoder_collapse  # noqa: E402
from ssl_experiment import PRESETS, prepare_data, write_json_atomic  # noqa: E402

parsed = encoder_collapse.parsed
PRESET = PRESETS["cpu"]
STEPS = PRESET.pretrain_epochs * math.ceil(PRESET.num_unlabelled / PRESET.pretrain_batch)
SETTINGS = {  # the powered CPU preset's pre-training, as ssl_experiment.pretrain passes it
    "feature_size": PRESET.feature_size,
    "roi_size": [PRESET.roi_size] * 3,
    "pixdim": list(PRESET.pixdim),
    "use_checkpoint": False,
    "num_samples": PRESET.pretrain_samples,
    "batch_size": PRESET.pretrain_batch,
    "learning_rate": PRESET.pretrain_lr,
    "warmup_steps": max(1, int(PRESET.warmup_fraction * STEPS)),
    "contrast_queue_size": PRESET.contrast_queue_size,
}
RELEASED_OPTIONS = {"rotation_axes": [1, 2], "cutout_budget": "uniform", "contrast_queue_size": 0}
ARMS = {  # name: settings changed from SETTINGS; None is the released code
    "released": None,
    "bundle with the released options": RELEASED_OPTIONS,
    "the same in float32": dict(RELEASED_OPTIONS, amp=False),
    "preset": {},
    "lr 4e-4": {"learning_rate": 4e-4},
    "lr 1e-4": {"learning_rate": 1e-4},
    "inpainting weight 0": {"inpaint_weight": 0.0},
    "gradient clipping at 1": {"grad_clip_norm": 1.0},
}
TERMS = ("inpaint", "contrast", "rotation")


def arm_settings(arm: str) -> dict:
    """The public settings of a bundle arm (the released arm shares the schedule's)."""
    changes = ARMS[arm] or {}
    settings = dict(SETTINGS, **changes)
    if "learning_rate" in changes:  # the warm-up stays the same share of the run
        settings["warmup_steps"] = SETTINGS["warmup_steps"]
    return settings


def split_random_transforms(parser) -> tuple[list, list]:
    """The config's random transforms cut after the sub-volume crop: (crops, views). The crops are shared by every
    arm; the views (rotation, cutout) are each arm's own."""
    from monai.transforms import RandSpatialCropSamplesd

    transforms = parsed(parser, "train#random_transforms")
    cut = next(i for i, t in enumerate(transforms) if isinstance(t, RandSpatialCropSamplesd)) + 1
    return transforms[:cut], transforms[cut:]


class SharedBatches:
    """The same sequence of training batches for every arm: each epoch a seeded permutation of the CTs in batches of
    `batch_size`, each CT cropped by the config's own crop transforms (seeded), as dicts with "image" and "donor".

    Args:
        parser: the preset's config.
        images: the unlabelled training CTs.
        seed: seeds the order and the crops.
    """

    def __init__(self, parser, images: list[str], seed: int = 0) -> None:
        from monai.transforms import Compose

        deterministic = Compose(parsed(parser, "train#deterministic_transforms"))
        self.volumes = [deterministic({"image": image}) for image in images]
        self.crops, _ = split_random_transforms(parser)
        self.batch_size = parser["batch_size"]
        self.seed = seed

    def __iter__(self):
        from monai.transforms import Compose

        crops = Compose(self.crops)
        crops.set_random_state(seed=self.seed)
        order = np.random.RandomState(self.seed)
        while True:
            permutation = order.permutation(len(self.volumes))
            for start in range(0, len(permutation) - self.batch_size + 1, self.batch_size):
                batch = []
                for index in permutation[start : start + self.batch_size]:
                    samples = crops(dict(self.volumes[index]))
                    batch += samples if isinstance(samples, list) else [samples]
                yield batch


def batch_checksum(batch: list[dict]) -> float:
    return float(sum(torch.as_tensor(sample["image"]).double().sum() for sample in batch))


def cpu_released_modules(checkout: str) -> types.SimpleNamespace:
    """The released `SSLHead`, `Loss`, `rot_rand`, `aug_rand` and `WarmupCosineSchedule`, imported from `checkout`
    and made to run on the CPU: they hard-code `cuda:<local_rank>` devices and `.cuda()` calls, so their modules see
    a `torch` whose `device()` is the CPU, and `Module.cuda` returns the module unchanged while CUDA is absent."""
    folder = os.path.join(checkout, "SwinUNETR", "Pretrain")
    if not os.path.isfile(os.path.join(folder, "models", "ssl_head.py")):
        raise FileNotFoundError(
            f"{folder}/models/ssl_head.py not found: --released must be a clone of Project-MONAI/research-contributions"
        )

    class CPUTorch(types.ModuleType):
        def __getattr__(self, name: str):
            return getattr(torch, name)

        @staticmethod
        def device(*args, **kwargs) -> torch.device:
            return torch.device("cpu")

    sys.path.insert(0, folder)
    try:
        modules = {name: importlib.import_module(name) for name in ("models.ssl_head", "losses.loss", "utils.ops")}
        schedule = importlib.import_module("optimizers.lr_scheduler")
    finally:
        sys.path.remove(folder)
    if not torch.cuda.is_available():
        torch.nn.Module.cuda = lambda module, device=None: module  # type: ignore[method-assign]
        for name in ("losses.loss", "utils.ops"):
            modules[name].torch = CPUTorch("torch")
    return types.SimpleNamespace(
        SSLHead=modules["models.ssl_head"].SSLHead,
        Loss=modules["losses.loss"].Loss,
        rot_rand=modules["utils.ops"].rot_rand,
        aug_rand=modules["utils.ops"].aug_rand,
        WarmupCosineSchedule=schedule.WarmupCosineSchedule,
    )


def copy_matching(source: dict[str, torch.Tensor], target: torch.nn.Module, renames: dict[str, str]) -> list[str]:
    """Copies every tensor of `source` (key prefixes renamed by `renames`) into `target` where the shapes agree;
    returns the target's keys left with their own initialisation."""
    state = target.state_dict()  # shares storage with the parameters
    own = set(state)
    for key, value in source.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        if key in state and state[key].shape == value.shape:
            state[key].copy_(value)
            own.discard(key)
    return sorted(own)


class BundleArm:
    """One training step of the pre-training bundle with `settings`, on a shared batch."""

    def __init__(self, settings: dict, initial: dict[str, torch.Tensor]) -> None:
        from monai.data import list_data_collate
        from monai.optimizers import WarmupCosineSchedule
        from monai.transforms import Compose

        parser = encoder_collapse.bundle_parser(**settings)
        self.network = parsed(parser, "network")
        own = self.network.state_dict()  # a head switched off by its weight is not built
        self.network.load_state_dict({k: v for k, v in initial.items() if k in own})
        self.loss = parsed(parser, "loss")
        self.inferer = parsed(parser, "train#inferer")
        self.prepare_batch = parsed(parser, "prepare_batch")
        _, views = split_random_transforms(parser)
        self.views = Compose(views)
        self.views.set_random_state(seed=1)
        self.collate = list_data_collate
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=settings["learning_rate"], weight_decay=parser["weight_decay"]
        )
        self.schedule = WarmupCosineSchedule(self.optimizer, settings["warmup_steps"], STEPS)
        self.clip = settings.get("grad_clip_norm")
        self.encoder = self.network.swinViT

    def step(self, batch: list[dict]) -> dict[str, float]:
        self.network.train()
        inputs, targets = self.prepare_batch(self.collate([self.views(dict(sample)) for sample in batch]))
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.inferer(inputs, self.network), targets)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        return {"total": loss.item(), **self.loss.terms}


class ReleasedArm:
    """One training step of the released code (its `main.py`'s `train`, float32) on a shared batch."""

    def __init__(self, released: types.SimpleNamespace, initial: dict[str, torch.Tensor]) -> None:
        batch = SETTINGS["batch_size"] * SETTINGS["num_samples"]
        self.args = types.SimpleNamespace(
            spatial_dims=3, in_channels=1, feature_size=SETTINGS["feature_size"], dropout_path_rate=0.0,
            use_checkpoint=False, local_rank="cpu", batch_size=batch, sw_batch_size=1,
        )  # fmt: skip
        torch.manual_seed(0)
        self.network = released.SSLHead(self.args, dim=SETTINGS["feature_size"] * 16)
        self.own_initialisation = copy_matching(initial, self.network, {"inpainting_head.": "conv."})
        self.loss = released.Loss(batch, self.args)
        self.rot_rand, self.aug_rand = released.rot_rand, released.aug_rand
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=SETTINGS["learning_rate"], weight_decay=1e-5)
        self.schedule = released.WarmupCosineSchedule(self.optimizer, SETTINGS["warmup_steps"], STEPS)
        self.encoder = self.network.swinViT
        np.random.seed(1)  # rot_rand and aug_rand draw from NumPy's global generator

    def step(self, batch: list[dict]) -> dict[str, float]:
        self.network.train()
        x = torch.stack([torch.as_tensor(sample["image"]).as_subclass(torch.Tensor) for sample in batch]).float()
        x1, rot1 = self.rot_rand(self.args, x)
        x2, rot2 = self.rot_rand(self.args, x)
        x1_augment, x2_augment = self.aug_rand(self.args, x1), self.aug_rand(self.args, x2)
        rot1_p, contrastive1_p, rec_x1 = self.network(x1_augment)
        rot2_p, contrastive2_p, rec_x2 = self.network(x2_augment)
        loss, (rotation, contrast, inpaint) = self.loss(
            torch.cat([rot1_p, rot2_p]), torch.cat([rot1, rot2]), contrastive1_p, contrastive2_p,
            torch.cat([rec_x1, rec_x2]), torch.cat([x1, x2]),
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return {"total": loss.item(), "inpaint": inpaint.item(), "contrast": contrast.item(),
                "rotation": rotation.item()}  # fmt: skip


def run_arm(arm, batches: SharedBatches, views: torch.Tensor, spread_every: int, path: str) -> list[dict]:
    """`STEPS` steps of `arm` on `batches`; writes one CSV row per step to `path` (atomically, at the end)."""
    rows = []
    iterator = iter(batches)
    for step in range(STEPS + 1):
        row: dict[str, float | int] = {"step": step}
        if step:
            batch = next(iterator)
            row["batch_checksum"] = batch_checksum(batch)
            row["lr"] = arm.optimizer.param_groups[0]["lr"]
            row.update(arm.step(batch))
        if step % spread_every == 0 or step == STEPS:
            row.update(
                {f"spread_stage{i}": s for i, s in enumerate(encoder_collapse.stage_spreads(arm.encoder, views))}
            )
        rows.append(row)
        if step % 8 == 0:
            print(f"  step {step}: " + " ".join(f"{k} {row[k]:.4f}" for k in ("total", *TERMS) if k in row), flush=True)
    with open(f"{path}.partial", "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f"{path}.partial", path)
    return rows


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def summarise(out_dir: str, results: dict[str, list[dict]], fresh: list[float], batch: int) -> dict:
    """Per arm: the three terms over the last 8 steps against their chance levels, the final spread of each stage
    over a fresh encoder's, and whether the encoder collapsed (some stage below half a fresh network's spread)."""
    chance = {"contrast": math.log(2 * batch - 1), "rotation": math.log(4)}
    summary = {"steps": STEPS, "fresh_spread": fresh, "chance": chance, "arms": {}}
    for arm, rows in results.items():
        last = [r for r in rows if "total" in r][-8:]
        final = [r for r in rows if "spread_stage0" in r][-1]
        ratios = [final[f"spread_stage{i}"] / fresh[i] for i in range(len(fresh))]
        summary["arms"][arm] = {
            **{term: float(np.mean([r[term] for r in last if term in r])) for term in TERMS if term in last[0]},
            "spread_over_fresh": ratios,
            "collapsed": min(ratios) < 0.5,
            "same_batches": [r.get("batch_checksum") for r in rows[1:4]],
        }
    return summary


def table(summary: dict) -> str:
    chance = summary["chance"]
    lines = [
        f"| arm | L1 | contrastive (chance {chance['contrast']:.3f}) | rotation CE (chance {chance['rotation']:.3f}) "
        "| final spread / fresh, stages 0-4 | collapsed |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        values = [f"{row[t]:.4f}" if t in row else "off" for t in TERMS]
        ratios = " / ".join(f"{r:.2f}" for r in row["spread_over_fresh"])
        lines.append(f"| {arm} | {' | '.join(values)} | {ratios} | {'yes' if row['collapsed'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(out_dir: str, results: dict[str, list[dict]], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    levels = {"contrast": summary["chance"]["contrast"], "rotation": summary["chance"]["rotation"]}
    for arm, rows in results.items():
        steps = [r["step"] for r in rows if "total" in r]
        for ax, term in zip(axes, TERMS):
            values = [r.get(term, np.nan) for r in rows if "total" in r]
            ax.plot(steps, values, lw=0.8, label=arm)
        spread = [(r["step"], r["spread_stage4"] / summary["fresh_spread"][4]) for r in rows if "spread_stage4" in r]
        axes[3].plot(*zip(*spread), marker="o", ms=3, label=arm)
    for ax, term in zip(axes, TERMS):
        ax.set_title({"inpaint": "inpainting L1", "contrast": "contrastive (NT-Xent)", "rotation": "rotation CE"}[term])
        if term in levels:
            ax.axhline(levels[term], color="grey", ls="--", lw=0.8, label="chance")
    axes[3].axhline(0.5, color="grey", ls="--", lw=0.8, label="half of fresh")
    axes[3].set_yscale("log")
    axes[3].set_title("bottleneck spread / fresh network's")
    for ax in axes:
        ax.set_xlabel("step")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "side_by_side.partial.png"), dpi=100)
    plt.close(fig)
    os.replace(os.path.join(out_dir, "side_by_side.partial.png"), os.path.join(out_dir, "side_by_side.png"))


def main(released: str, out_dir: str = "experiments/ssl_side_by_side", arms: tuple[str, ...] = tuple(ARMS),
         spread_every: int = 16) -> dict:  # fmt: skip
    """Runs (or resumes) the arms; returns the summary.

    Args:
        released: a clone of Project-MONAI/research-contributions.
        out_dir: where the data, the per-arm logs and the summary go.
        arms: which of `ARMS` to run, in this order.
        spread_every: steps between two measurements of the encoder's spread.
    """
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"arms {unknown} are not among {list(ARMS)}.")
    code = cpu_released_modules(released) if "released" in arms else None
    torch.set_flush_denormal(True)  # as the bundles' `initialize` does; only values below float32's normal range change
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, "arms"), exist_ok=True)
    lists = prepare_data(out_dir, PRESET)
    with open(lists["pretrain"]) as f:
        images = [case["image"] for case in json.load(f)["training"]]
    with open(lists["test"]) as f:
        held_out = [case["image"] for case in json.load(f)["validation"]]
    parser = encoder_collapse.bundle_parser(**SETTINGS)
    views = encoder_collapse.held_out_views(parser, held_out, SETTINGS["roi_size"])
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in parsed(parser, "network_def").state_dict().items()}
    fresh = parsed(encoder_collapse.bundle_parser(**SETTINGS), "network_def")
    fresh.load_state_dict(initial)
    fresh_spread = encoder_collapse.stage_spreads(fresh.swinViT, views)
    batches = None
    results = {}
    for arm in arms:
        path = os.path.join(out_dir, "arms", f"{arm.replace(' ', '_')}.csv")
        if not os.path.exists(path):
            batches = batches or SharedBatches(parser, images)
            print(f"{arm}:", flush=True)
            torch.manual_seed(0)
            trainer = ReleasedArm(code, initial) if ARMS[arm] is None else BundleArm(arm_settings(arm), initial)
            with contextlib.suppress(AttributeError):
                print(f"  released SSLHead tensors with their own initialisation: {trainer.own_initialisation}")
            run_arm(trainer, batches, views, spread_every, path)
        results[arm] = read_rows(path)
    summary = summarise(out_dir, results, fresh_spread, SETTINGS["batch_size"] * SETTINGS["num_samples"])
    write_json_atomic(summary, os.path.join(out_dir, "summary.json"))
    with open(os.path.join(out_dir, "side_by_side.md"), "w") as f:
        f.write(table(summary))
    plot(out_dir, results, summary)
    print(table(summary))
    return summary


if __name__ == "__main__":
    import fire

    fire.Fire(main)
