"""CPU/GPU benchmark: the bundles as shipped against the reference recipe, A/B interleaved in one run.

Four workloads, each timed per engine iteration after a warm-up, in a fresh process per measurement:

- `btcv_train`:  one BTCV training iteration, SwinUNETR feature 48, one 96^3 patch (batch 1, num_samples 1).
- `btcv_train_step`: the same with the bundle's own step of 4 patches (num_samples 4), as fine-tuning runs by default.
- `btcv_infer`:  BTCV inference of one 128x128x96 CT, roi 96, overlap 0.5, sw_batch_size 4 (load, sliding window,
                 invert, argmax, write).
- `ssl_train`:   one pre-training step, feature 48, 96^3, 2 crops x 2 views.

Variants:
- `reference`: the Model Zoo / paper recipe, as a new user runs it: gradient checkpointing on, no denormal flush,
  plain Dataset, MONAI's own attention and defaults everywhere (`ci/benchmark/reference_*.json`).
- `reference_tuned`: the same recipe with the best environment tuning found outside the code: denormals flushed,
  glibc keeping freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_).
- `shipped`: `python -m monai.bundle run` of the bundle's own configs with no speed flags at all.
- `opt_in`: shipped plus the opt-in speed settings the model cards document, which trade exactness for time
  (`OPT_IN`: bfloat16 inference on CPU); skipped where there is none.
- `openvino`: shipped with `cpu_inference_engine` `openvino` (inference only; its warm-up iteration holds the
  conversion, or reads it from the cache a previous round left beside the model).

Each variant runs `--rounds` times in the order reference, reference_tuned, shipped, opt_in, openvino, ... so that
drift of the machine hits all alike. Prints medians, ratios, peak RSS (of the bundle process, from wait4), peak GPU
memory on CUDA, and the machine it ran on. A variant killed for lack of memory is reported and the others go on.

    .venv/bin/python ci/benchmark.py                       # all four workloads, 2 rounds (about an hour on 2 cores)
    .venv/bin/python ci/benchmark.py --workloads btcv_infer --rounds 1 --iterations 2
    .venv/bin/python ci/benchmark.py --workloads btcv_train --variants shipped --shipped_overrides '{"amp": false}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "ci", "benchmark")
BUNDLES = os.path.join(REPO, "bundles")
VARIANTS = ("reference", "reference_tuned", "shipped", "opt_in", "openvino")
# CPU levers (on CUDA inference `amp` is float16 AMP by default): `amp` in inference gives bfloat16 probabilities.
# Training ships with the memory pool on CPU (and one patch or sub-volume per pass): nothing left to opt into.
OPT_IN = {"btcv_train": {}, "btcv_train_step": {}, "btcv_infer": {"amp": True}, "ssl_train": {}}
ENGINE = {"btcv_train": {}, "btcv_train_step": {}, "btcv_infer": {"cpu_inference_engine": "openvino"}, "ssl_train": {}}
# the settings each variant adds to the shipped configs (a variant with none for a workload is skipped there)
ADDED = {"opt_in": OPT_IN, "openvino": ENGINE}
TUNED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def workload(name: str, data: dict, iterations: int) -> dict:
    """Bundle configs, engine to time and overrides (same for all variants) of one workload."""
    runs = iterations + 1  # the first iteration is the warm-up
    if name in ("btcv_train", "btcv_train_step"):
        configs = [os.path.join(BUNDLES, "swin_unetr_btcv", "configs", "train.json")]
        overrides = {"dataset_dir": data["btcv"], "max_epochs": 1, "val_interval": 1000,
                     "datalist": data[f"btcv_train_{runs}"]}  # fmt: skip
        if name == "btcv_train":
            overrides["num_samples"] = 1
        return {"configs": configs, "engine": "train#trainer", "overrides": overrides, "reference": "btcv_train"}
    if name == "btcv_infer":
        configs = [os.path.join(BUNDLES, "swin_unetr_btcv", "configs", "inference.json")]
        overrides = {"dataset_dir": data["btcv"], "datalist": data[f"btcv_infer_{runs}"], "overlap": 0.5,
                     "ckpt_dir": data["btcv_models"]}  # fmt: skip
        return {"configs": configs, "engine": "evaluator", "overrides": overrides, "reference": name}
    if name == "ssl_train":
        configs = [os.path.join(BUNDLES, "swin_unetr_pretrain", "configs", "train.json")]
        overrides = {"dataset_dir": data["ssl"], "datalist": data[f"ssl_train_{runs}"], "max_epochs": 1,
                     "val_interval": 100000, "batch_size": 1, "num_samples": 2}  # fmt: skip
        return {"configs": configs, "engine": "train#trainer", "overrides": overrides, "reference": name}
    raise ValueError(f"unknown workload {name!r}; choose from btcv_train, btcv_train_step, btcv_infer, ssl_train.")


def make_data(root: str, max_runs: int) -> dict:
    """A 128x128x96 synthetic CT at the bundles' spacing (labelled), its copies, datalists and a BTCV model file."""
    sys.path.insert(0, os.path.join(REPO, "ci"))
    import synthetic_ct
    import torch
    from monai.networks.nets import SwinUNETR

    btcv = synthetic_ct.generate(os.path.join(root, "btcv"), num_train=1, num_test=0, shape=(128, 128, 96),
                                 spacing=(1.5, 1.5, 2.0), seed=7)  # fmt: skip
    case = {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    data = {"btcv": btcv, "ssl": os.path.join(btcv, "imagesTr"), "btcv_models": os.path.join(root, "models")}
    for runs in range(1, max_runs + 1):
        lists = {
            f"btcv_train_{runs}": {"training": [case] * runs, "validation": [case]},
            f"btcv_infer_{runs}": {"testing": [{"image": case["image"]}] * runs},
            f"ssl_train_{runs}": {
                "training": [{"image": "img0001.nii.gz"}] * runs,
                "validation": [{"image": "img0001.nii.gz"}],
            },
        }
        for key, content in lists.items():
            data[key] = os.path.join(root, f"{key}.json")
            with open(data[key], "w") as f:
                json.dump(content, f)
    os.makedirs(data["btcv_models"], exist_ok=True)
    torch.manual_seed(0)
    torch.save(SwinUNETR(1, 14, feature_size=48).state_dict(), os.path.join(data["btcv_models"], "model.pt"))
    return data


def child(args: argparse.Namespace) -> None:
    """Runs one bundle workflow as `python -m monai.bundle run` does, timing each iteration of one engine."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    spec = json.loads(args.spec)
    sys.path.insert(0, os.path.dirname(os.path.dirname(spec["configs"][0])))  # as `monai.bundle run` does
    workflow = ConfigWorkflow(config_file=spec["configs"], workflow_type=None, **spec["overrides"])
    workflow.initialize()  # the process-wide memory settings, before the engine is built, as in a real run
    engine = workflow.parser.get_parsed_content(spec["engine"])
    import torch

    stamps: list[float] = []

    def stamp(_) -> None:
        if torch.cuda.is_available():  # CUDA kernels run asynchronously: time the finished work
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    engine.add_event_handler(Events.STARTED, stamp)
    engine.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    workflow.run()
    workflow.finalize()
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    gpu_peak = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
    with open(args.result, "w") as f:
        json.dump({"warmup": durations[:1], "iterations": durations[1:], "peak_gpu_gb": gpu_peak}, f)


def measure(name: str, variant: str, data: dict, iterations: int, work: str, shipped_overrides: dict) -> dict:
    spec = workload(name, data, iterations)
    if variant in ("shipped", *ADDED):
        spec["overrides"].update(shipped_overrides)
    if variant in ADDED:
        spec["overrides"].update(ADDED[variant][name])
    if variant.startswith("reference"):
        spec["configs"] = spec["configs"] + [os.path.join(HERE, f"reference_{spec['reference']}.json")]
    if variant == "reference_tuned":
        spec["configs"] = spec["configs"] + [os.path.join(HERE, "flush_denormals.json")]
    spec["overrides"]["output_dir"] = os.path.join(work, "out")
    if name != "btcv_infer":
        spec["overrides"]["ckpt_dir"] = os.path.join(work, "ckpt")
    result = os.path.join(work, "result.json")
    env = dict(os.environ, **(TUNED_ENV if variant == "reference_tuned" else {}))
    cmd = [sys.executable, __file__, "--child", "--spec", json.dumps(spec), "--result", result]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read()
    if os.WIFSIGNALED(status):  # the kernel's OOM killer leaves no traceback
        killed = MemoryError(f"{name}/{variant} was killed by signal {os.WTERMSIG(status)} (out of memory?), peak RSS "
                             f"{usage.ru_maxrss / 1024**2:.1f} GB")  # fmt: skip
        killed.peak_rss_gb = usage.ru_maxrss / 1024**2
        raise killed
    if status != 0:
        raise RuntimeError(f"{name}/{variant} failed:\n{stderr[-3000:]}")
    with open(result) as f:
        timings = json.load(f)
    return {
        "iterations": timings["iterations"],
        "peak_rss_gb": usage.ru_maxrss / 1024**2,
        "peak_gpu_gb": timings["peak_gpu_gb"],
    }


def machine() -> str:
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["btcv_train", "btcv_train_step", "btcv_infer", "ssl_train"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds per workload")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per process, after 1 warm-up")
    parser.add_argument(
        "--shipped_overrides",
        type=json.loads,
        default={},
        help="settings for the shipped, opt_in and openvino variants, to try one out: '{\"use_checkpoint\": false}'",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(
        f"machine: {machine()}" + (f"; shipped with {args.shipped_overrides}" if args.shipped_overrides else ""),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="swin_bench_") as root:
        data = make_data(root, args.iterations + 1)
        rows = []
        for name in args.workloads:
            results = {v: {"iterations": [], "peak_rss_gb": 0.0, "peak_gpu_gb": 0.0} for v in args.variants}
            for round_ in range(args.rounds):
                for variant in args.variants:
                    if variant in ADDED and not ADDED[variant][name]:
                        continue
                    with tempfile.TemporaryDirectory(dir=root) as work:
                        try:
                            r = measure(name, variant, data, args.iterations, work, args.shipped_overrides)
                        except MemoryError as e:  # the other variants still get measured
                            print(f"{name} round {round_ + 1} {variant}: {e}", flush=True)
                            results[variant]["peak_rss_gb"] = max(results[variant]["peak_rss_gb"], e.peak_rss_gb)
                            continue
                    results[variant]["iterations"] += r["iterations"]
                    for peak in ("peak_rss_gb", "peak_gpu_gb"):
                        results[variant][peak] = max(results[variant][peak], r[peak] or 0.0)
                    times = ", ".join(f"{t:.3g}" for t in r["iterations"])
                    gpu = f", peak GPU memory {r['peak_gpu_gb']:.2f} GB" if r["peak_gpu_gb"] is not None else ""
                    print(
                        f"{name} round {round_ + 1} {variant}: {times} s, peak RSS {r['peak_rss_gb']:.2f} GB{gpu}",
                        flush=True,
                    )
            medians = {
                v: statistics.median(results[v]["iterations"]) for v in args.variants if results[v]["iterations"]
            }
            peaks = {}
            for v in args.variants:
                gpu = results[v]["peak_gpu_gb"]
                peaks[v] = f"{results[v]['peak_rss_gb']:.1f}" + (f", GPU {gpu:.1f}" if gpu else "")
            rows.append((name, medians, peaks))
    pairs = [(fast, ref) for fast in ("shipped", "opt_in", "openvino") for ref in ("reference", "reference_tuned")]
    pairs = [(fast, ref) for fast, ref in pairs if fast in args.variants and ref in args.variants]
    pairs += [("openvino", "shipped")] if {"openvino", "shipped"} <= set(args.variants) else []
    print("\n| workload | " + " | ".join(f"{v} median s (peak GB)" for v in args.variants) + " | "
          + " | ".join(f"{fast} vs {ref}" for fast, ref in pairs) + " |")  # fmt: skip
    print("|---" * (len(args.variants) + len(pairs) + 1) + "|")
    for name, medians, rss in rows:
        cells = " | ".join(
            f"{medians[v]:.3g} ({rss[v]})" if v in medians else "none" if v in ADDED and not ADDED[v][name]
            else f"killed ({rss[v]})"
            for v in args.variants
        )  # fmt: skip
        ratios = " | ".join(f"{medians[ref] / medians[fast]:.2f}x" if fast in medians and ref in medians else "-"
                            for fast, ref in pairs)  # fmt: skip
        print(f"| {name} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()
