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
from crce.sample import plan_images, sample_images  # noqa: E402
from crce.worlds.tiny import build_tiny_pipeline  # noqa: E402


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
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    resolution = 32 if args.model == "tiny" else 512
    with tempfile.TemporaryDirectory() as tmp:
        build = build_tiny_pipeline if args.model == "tiny" else build_sd14_size_pipeline
        pipe = load_pipeline(str(build(Path(tmp) / "m")), dtype=dtype, device=device)
        plan = plan_images(split(), method="sd", seed=0, images_per_prompt=8)
        plan = plan.head(args.images)
        ours, baseline = [], []
        for r in range(args.rounds + 1):  # round 0 warms up
            folder = Path(tmp) / f"ours{r}"
            sync(device)
            start = time.perf_counter()
            sample_images(pipe, plan, folder, steps=args.steps, guidance=7.5, resolution=resolution,
                          batch_size=args.batch_size, progress=False)  # fmt: skip
            sync(device)
            ours.append(len(plan) / (time.perf_counter() - start))
            start = time.perf_counter()
            n = (args.baseline_images or len(plan)) if r else 2
            for prompt, seed in list(zip(plan["prompt"], plan["seed"], strict=True))[:n]:
                pipe(prompt, num_inference_steps=args.steps, guidance_scale=7.5, height=resolution,
                     width=resolution, generator=torch.Generator().manual_seed(int(seed)), output_type="np")  # fmt: skip
            sync(device)
            baseline.append(n / (time.perf_counter() - start))
        ours, baseline = ours[1:], baseline[1:]
        row = {
            "model": args.model,
            "device": str(device),
            "images": len(plan),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "batched_images_per_s": statistics.median(ours),
            "batched_range": [min(ours), max(ours)],
            "batch1_images_per_s": statistics.median(baseline),
            "batch1_range": [min(baseline), max(baseline)],
            "ratio": statistics.median(o / b for o, b in zip(ours, baseline, strict=True)),
        }
        print(json.dumps(row))
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
