"""Iteration time and peak memory: the trainer vs the naive reference (official-code pattern).

    python bench/train_step.py --model tiny --device cpu          # tiny CPU model
    python bench/train_step.py --model sd14 --device cuda         # SD1.4-size, random weights

Both run the same iterations (same x_t rollout lengths), interleaved, so the ratio is fair on
a noisy machine. The reference runs fp32 as the official code does; the trainer runs with the
precision given (bf16 autocast on GPU by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import make_cat_split as split  # noqa: E402
from sd14 import build_sd14_size_pipeline  # noqa: E402

from crce.erase import Eraser  # noqa: E402
from crce.modeling import load_pipeline  # noqa: E402
from crce.settings import TrainSettings  # noqa: E402
from crce.worlds.tiny import build_tiny_pipeline  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, iterations, device, warmup=2):
    for k in range(warmup):
        step(10_000 + k)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(iterations):
        start = time.perf_counter()
        step(k)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return times, peak


def summary(times):
    q = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "sd14"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument(
        "--precision", default=None, help="trainer precision (default: bf16 on GPU)"
    )
    parser.add_argument("--methods", default="esd-x,crce")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    from reference_trainer import ReferenceTrainer

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_pipeline if args.model == "tiny" else build_sd14_size_pipeline
        path = str(build(Path(tmp) / args.model))
        for method in args.methods.split(","):
            kw = dict(lr=1e-5, ddim_steps=args.ddim_steps)
            if method == "crce":
                kw.update(strategy="crce", n_corefs=5, n_retains=3)
            else:
                kw.update(strategy="esd")
            row = {"model": args.model, "device": str(device), "method": method}
            dtype = (
                torch.bfloat16
                if precision == "bfloat16" and device.type == "cuda"
                else torch.float32
            )
            if device.type == "cpu":
                # Both in memory, steps alternated: the machine's noise hits both alike.
                ours = Eraser(
                    load_pipeline(path, dtype=dtype),
                    {method: TrainSettings(**kw, precision=precision)},
                    "cat",
                    split(),
                    seed=0,
                )
                ref = ReferenceTrainer(load_pipeline(path), "cat", split(), **kw, seed=0)
                times = {"trainer": [], "reference": []}
                for k in range(args.iterations + 2):
                    for name, step in (("trainer", ours.step), ("reference", ref.step)):
                        start = time.perf_counter()
                        step(k)
                        if k >= 2:  # two warm-up iterations
                            times[name].append(time.perf_counter() - start)
                row["trainer"] = {**summary(times["trainer"]), "precision": precision}
                row["reference"] = {**summary(times["reference"]), "precision": "float32"}
            else:
                # One model on the GPU at a time, so each peak memory is its own.
                pipe = load_pipeline(path, dtype=dtype, device=device)
                ours = Eraser(
                    pipe, {method: TrainSettings(**kw, precision=precision)}, "cat", split(), seed=0
                )
                times, peak = measure(ours.step, args.iterations, device)
                row["trainer"] = {**summary(times), "peak_gib": peak, "precision": precision}
                del ours, pipe
                torch.cuda.empty_cache()
                pipe = load_pipeline(path, device=device)
                ref = ReferenceTrainer(pipe, "cat", split(), **kw, seed=0)
                times, peak = measure(ref.step, args.iterations, device)
                row["reference"] = {**summary(times), "peak_gib": peak, "precision": "float32"}
                row["memory_ratio"] = row["trainer"]["peak_gib"] / peak
                del ref, pipe
                torch.cuda.empty_cache()
            row["speedup"] = row["reference"]["median_s"] / row["trainer"]["median_s"]
            print(json.dumps(row))
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
