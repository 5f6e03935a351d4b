"""Sampling throughput: the batched sampler vs a batch-1 StableDiffusionPipeline call, side by side.

    python bench/sample.py --model tiny --device cpu --images 32 --batch-size 32
    python bench/sample.py --model sd14 --device cuda --images 64 --batch-size 32   # GPU

Rounds alternate between the two so both see the same machine state.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd14 import build_sd14_size_pipeline  # noqa: E402
from train_step import split, sync  # noqa: E402

from crce.modeling import load_pipeline  # noqa: E402
from crce.sample import plan_images, sample_images, set_scheduler  # noqa: E402
from crce_worlds.tiny import build_tiny_pipeline  # noqa: E402


def measure(path, model, device, *, images, batch_size, steps, rounds, baseline_images=None,
            deadline=None) -> dict:  # fmt: skip
    """Images/s of the batched sampler and of batch-1 pipeline calls, rounds alternated (round
    0 warms up); stops after a round once past `deadline` (time.monotonic)."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    resolution = 32 if model == "tiny" else 512
    pipe = load_pipeline(path, dtype=dtype, device=device)
    set_scheduler(pipe, "ddim")
    plan = plan_images(split(), method="sd", seed=0, images_per_prompt=8).head(images)
    ours, baseline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):
            if r > 1 and deadline is not None and time.monotonic() > deadline:
                break
            sync(device)
            start = time.perf_counter()
            sample_images(pipe, plan, Path(tmp) / f"ours{r}", steps=steps, guidance=7.5,
                          resolution=resolution, batch_size=batch_size, progress=False)  # fmt: skip
            sync(device)
            ours.append(len(plan) / (time.perf_counter() - start))
            start = time.perf_counter()
            n = (baseline_images or len(plan)) if r else 2
            for prompt, seed in list(zip(plan["prompt"], plan["seed"], strict=True))[:n]:
                pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=resolution,
                     width=resolution, generator=torch.Generator().manual_seed(int(seed)), output_type="np")  # fmt: skip
            sync(device)
            baseline.append(n / (time.perf_counter() - start))
    ours, baseline = ours[1:], baseline[1:]
    return {
        "model": model,
        "device": str(device),
        "images": len(plan),
        "steps": steps,
        "batch_size": batch_size,
        "batched_images_per_s": statistics.median(ours),
        "batched_range": [min(ours), max(ours)],
        "batch1_images_per_s": statistics.median(baseline),
        "batch1_range": [min(baseline), max(baseline)],
        "ratio": statistics.median(o / b for o, b in zip(ours, baseline, strict=True)),
        "rounds": len(ours),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "sd14"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-images", type=int, default=None, help="batch-1 images per round"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_pipeline if args.model == "tiny" else build_sd14_size_pipeline
        path = str(build(Path(tmp) / "m"))
        row = measure(path, args.model, args.device, images=args.images,
                      batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
                      baseline_images=args.baseline_images)  # fmt: skip
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
