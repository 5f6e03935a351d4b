"""Every GPU figure of the project in one run, each section under its own time budget, into
one JSON file (BENCHMARKS.md: "Reading gpu.json").

    python bench/gpu_run.py --out gpu.json                       # SD1.4 size on the GPU
    python bench/gpu_run.py --out gpu.json --rehearse            # the same, tiny model, CPU
    python bench/gpu_run.py --out gpu.json --sections compile    # opt-in sections by name

Sections: preflight (imports, device), train_single (ESD-x and CRCE: the trainer in bf16
against the official pattern in fp32, time per iteration and peak memory), train_grouped (the
paper's five methods as one group against the official pattern running them one after the
other), sample (images/s: the batched sampler at batch 32 against the batch-1 pipeline), and
opt-in: compile (the grouped trainer with torch.compile of the UNet). A section that reaches
its budget stops between iterations and says so (`truncated`); one that fails records its
error and the run goes on, so one problem costs one section, not the lease.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

# Seconds per section at SD1.4 size (the whole run must end inside 8 minutes).
BUDGETS = {"train_single": 120, "train_grouped": 150, "sample": 90, "compile": 120}
DEFAULT = ["train_single", "train_grouped", "sample"]


def preflight(device: str) -> dict:
    """Everything the sections import, and the device: fails in seconds, saying what lacks."""
    missing = []
    for module in ("torch", "diffusers", "transformers", "safetensors", "pydantic", "pandas",
                   "crce.training.engine", "crce.sample", "reference_trainer", "sd14"):  # fmt: skip
        try:
            __import__(module)
        except ImportError as err:
            missing.append(f"{module} ({err})")
    if missing:
        raise SystemExit("preflight: cannot import " + "; ".join(missing) + " (bench/gpu.sh)")
    import diffusers
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("preflight: no CUDA device visible to torch")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
    }
    if device == "cuda":
        info["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def train_section(path, model, device, grouped, budget, compile_unet=False):
    from train_step import PAPER_METHODS, measure_cpu, measure_gpu

    args = SimpleNamespace(
        model=model, device=device, ddim_steps=50, grouped=grouped, memory=False, threads=None,
        precision="bfloat16" if device == "cuda" else "float32",
        iterations=5, deadline=time.monotonic() + budget, compile=compile_unet,
    )  # fmt: skip
    runs = [list(PAPER_METHODS)] if grouped else [["esd-x"], ["crce"]]
    rows = []
    for methods in runs:
        measure = measure_gpu if device == "cuda" else measure_cpu
        times, peaks = measure(path, methods, args)
        rows.append(
            {
                "methods": methods,
                "trainer_s": statistics.median(times["trainer"]),
                "reference_s": statistics.median(times["reference"]),
                "speedup": statistics.median(times["reference"])
                / statistics.median(times["trainer"]),
                "iterations": {k: len(v) for k, v in times.items()},
                "trainer_times_s": times["trainer"],
                "reference_times_s": times["reference"],
                "peak_mib": peaks,
                "truncated": time.monotonic() > args.deadline,
            }
        )
    return {"precision": args.precision, "ddim_steps": 50, "runs": rows}


def sample_section(path, model, device, budget):
    from sample import measure

    images = 64 if device == "cuda" else 8
    return measure(path, model, device, images=images, batch_size=32 if device == "cuda" else 8,
                   steps=50 if device == "cuda" else 5, rounds=2, baseline_images=8 if device == "cuda" else 2,
                   deadline=time.monotonic() + budget)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rehearse", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--sections", default=",".join(DEFAULT))
    args = parser.parse_args()
    device = "cpu" if args.rehearse else "cuda"
    model = "tiny" if args.rehearse else "sd14"
    scale = 0.1 if args.rehearse else 1.0
    out = Path(args.out)
    result = {"model": model, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["preflight"] = preflight(device)
    out.write_text(json.dumps(result, indent=2))
    import torch
    from sd14 import build_sd14_size_pipeline

    from crce_worlds.tiny import build_tiny_pipeline

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_pipeline if model == "tiny" else build_sd14_size_pipeline
        path = str(build(Path(tmp) / model))
        result["build_s"] = time.perf_counter() - began
        sections = result["sections"] = {}
        for name in args.sections.split(","):
            budget = BUDGETS[name] * scale
            began = time.perf_counter()
            try:
                if name in ("train_single", "train_grouped", "compile"):
                    grouped = name != "train_single"
                    sections[name] = train_section(path, model, device, grouped, budget,
                                                   compile_unet=name == "compile")  # fmt: skip
                elif name == "sample":
                    sections[name] = sample_section(path, model, device, budget)
                else:
                    raise ValueError(f"unknown section {name!r}")
            except Exception as err:  # one failed section must not lose the others
                sections[name] = {"error": f"{type(err).__name__}: {err}",
                                  "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
            sections[name]["wall_s"] = time.perf_counter() - began
            sections[name]["budget_s"] = budget
            if device == "cuda":
                torch.cuda.empty_cache()
            out.write_text(json.dumps(result, indent=2))  # what ran survives a kill
            print(json.dumps({name: {k: v for k, v in sections[name].items() if k != "traceback"}}),
                  flush=True)  # fmt: skip
    failed = [n for n, s in sections.items() if "error" in s]
    if failed:
        raise SystemExit(f"sections failed: {', '.join(failed)} (see {out})")


if __name__ == "__main__":
    main()
