"""Iteration time and peak memory: the trainer vs the official code's pattern (the naive
reference in tests/: two UNets, one batch-2 call per prediction, fp32).

    python bench/train_step.py --model tiny --device cpu             # per method: ESD-x, CRCE
    python bench/train_step.py --model tiny --device cpu --grouped   # the paper's 5 methods
    python bench/train_step.py --model sd14 --device cuda --grouped  # SD1.4-size, random weights

Per method: the trainer and the reference run the same iterations (same x_t rollouts). With
--grouped, one grouped trainer trains the paper's five methods (ESD-x, RealEra, CRCE-Sphere,
CRCE-Fixed, CRCE) per step, against the reference running the same five one after another.
On a CPU both sides run in one process with their steps alternated, so the machine's noise
hits both alike; peak memory is measured in a fresh process per side (its max RSS, the
interpreter and the loaded models included). On a GPU each side runs alone (its own peak memory), the trainer in bf16
autocast by default, the reference in fp32 as the official code.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import make_cat_split as split  # noqa: E402
from reference_trainer import ReferenceTrainer  # noqa: E402
from sd14 import build_sd14_size_pipeline  # noqa: E402

from crce.modeling import load_pipeline  # noqa: E402
from crce.settings import TrainRuntime  # noqa: E402
from crce.training.engine import Engine  # noqa: E402
from crce_worlds.tiny import build_tiny_pipeline  # noqa: E402

# The paper study's methods (config/config.yaml) with their M, N and anchors.
PAPER_METHODS = {
    "esd-x": dict(strategy="esd"),
    "realera": dict(strategy="realera", n_corefs=10, n_retains=2),
    "crce-sphere": dict(strategy="sphere", n_corefs=5, n_retains=3, coref_anchor="self"),
    "crce-fixed": dict(strategy="crce", n_corefs=5, n_retains=3, fixed=True),
    "crce": dict(strategy="crce", n_corefs=5, n_retains=3),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(times):
    q = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


def sphere_for(model: str) -> dict:
    """R = 400 fits CLIP-L (the SD1.4-size model); the tiny text space takes 1.2 |e|."""
    return dict(radius=1.2, radius_mode="relative") if model == "tiny" else {}


class Sides:
    """The trainer (one Engine for all methods, or one per method) and the reference."""

    def __init__(self, path, methods, args, device, side):
        self.steps = []
        sphere = sphere_for(args.model)
        common = dict(lr=1e-5, ddim_steps=args.ddim_steps)
        if side == "trainer":
            dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
            spherical = ("sphere", "realera")
            settings = {
                m: {**common, **PAPER_METHODS[m], "precision": args.precision,
                    **({"sphere": sphere} if PAPER_METHODS[m]["strategy"] in spherical else {})}
                for m in methods
            }  # fmt: skip
            groups = [settings] if args.grouped else [{m: s} for m, s in settings.items()]
            runtime = TrainRuntime(compile=getattr(args, "compile", False))
            for group in groups:
                pipe = load_pipeline(path, dtype=dtype, device=device)
                engine = Engine.from_settings(pipe, group, target="cat", split=split(), seed=0,
                                              runtime=runtime)  # fmt: skip
                self.steps.append(engine.step)
        else:
            for m in methods:
                pipe = load_pipeline(path, device=device)
                trainer = ReferenceTrainer(pipe, "cat", split(), **common, **PAPER_METHODS[m],
                                           **sphere, seed=0)  # fmt: skip
                self.steps.append(trainer.step)

    def step(self, k):
        for step in self.steps:
            step(k)


def peak_rss_mib(path, methods, args, side, queue):
    """Run in a fresh process: its max RSS after loading the side's models and training."""
    torch.set_num_threads(args.threads)
    sides = Sides(path, methods, args, torch.device("cpu"), side)
    for k in range(3):
        sides.step(k)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cpu_memory(path, methods, args):
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for side in ("trainer", "reference"):
        queue = context.Queue()
        process = context.Process(target=peak_rss_mib, args=(path, methods, args, side, queue))
        process.start()
        peaks[side] = queue.get()
        process.join()
    return peaks


def in_time(args, times) -> bool:
    """Go on while under the deadline (if any), but measure at least two iterations."""
    deadline = getattr(args, "deadline", None)
    return deadline is None or time.monotonic() < deadline or len(times) < 2


def measure_cpu(path, methods, args):
    device = torch.device("cpu")
    sides = {s: Sides(path, methods, args, device, s) for s in ("trainer", "reference")}
    times = {"trainer": [], "reference": []}
    for k in range(args.iterations + 2):
        if k > 2 and not in_time(args, times["reference"]):
            break
        for name, side in sides.items():  # alternated, same iteration k: same rollouts
            start = time.perf_counter()
            side.step(k)
            if k >= 2:  # two warm-up iterations
                times[name].append(time.perf_counter() - start)
    return times, cpu_memory(path, methods, args) if args.memory else {}


def measure_gpu(path, methods, args):
    device = torch.device(args.device)
    times, peaks = {}, {}
    for name in ("trainer", "reference"):  # one side on the GPU at a time: its own peak
        side = Sides(path, methods, args, device, name)
        for k in range(2):
            side.step(10_000 + k)
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        times[name] = []
        for k in range(args.iterations):
            if not in_time(args, times[name]):
                break
            start = time.perf_counter()
            side.step(k)
            sync(device)
            times[name].append(time.perf_counter() - start)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        del side
        torch.cuda.empty_cache()
    return times, peaks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "sd14"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--precision", default=None, help="trainer (default: bf16 on GPU)")
    parser.add_argument("--methods", default=None, help="default: esd-x,crce; --grouped: all 5")
    parser.add_argument("--grouped", action="store_true", help="the paper's methods as a group")
    parser.add_argument("--memory", action="store_true", help="CPU peak RSS per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bfloat16" if args.device != "cpu" else "float32")
    default = ",".join(PAPER_METHODS) if args.grouped else "esd-x,crce"
    names = (args.methods or default).split(",")
    runs = [names] if args.grouped else [[m] for m in names]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_pipeline if args.model == "tiny" else build_sd14_size_pipeline
        path = str(build(Path(tmp) / args.model))
        for methods in runs:
            measure = measure_cpu if args.device == "cpu" else measure_gpu
            times, peaks = measure(path, methods, args)
            row = {
                "model": args.model,
                "device": args.device,
                "grouped": args.grouped,
                "methods": methods,
                "ddim_steps": args.ddim_steps,
                "trainer": {**summary(times["trainer"]), "precision": args.precision},
                "reference": {**summary(times["reference"]), "precision": "float32"},
                "speedup": statistics.median(times["reference"])
                / statistics.median(times["trainer"]),
                # Per-iteration ratios (same k on both sides): the spread of the speedup.
                "speedup_q1_q3": statistics.quantiles(
                    [r / t for r, t in zip(times["reference"], times["trainer"], strict=True)],
                    n=4,
                )[::2],
            }
            if peaks:
                unit = "peak_rss_mib" if args.device == "cpu" else "peak_mib"
                row["trainer"][unit], row["reference"][unit] = peaks["trainer"], peaks["reference"]
            print(json.dumps(row))
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
