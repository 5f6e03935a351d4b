"""Concept Ablation: the engine's trainer vs the official loop's pattern (tests/reference_ca.py:
a deep-copied UNet, both text encodings every step), same iterations on the same anchor
latents, runs alternated in one process so the machine's noise hits both alike.

    python bench/ca_step.py --rounds 5 --iterations 20      # tiny CPU model
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

from helpers import make_cat_split  # noqa: E402
from reference_ca import train_ca  # noqa: E402

from crce.modeling import load_pipeline  # noqa: E402
from crce.references import ReferenceSet  # noqa: E402
from crce.training.engine import Engine  # noqa: E402
from crce_worlds.tiny import build_tiny_pipeline  # noqa: E402

PROMPTS = [f"a photo of a animal number {k}" for k in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = str(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd", seed=0))
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size
    latents = torch.randn(
        (len(PROMPTS) * 10, 4, size, size), generator=torch.Generator().manual_seed(0)
    )
    references = {"anchor": ReferenceSet(latents, {"prompts": PROMPTS, "images_per_prompt": 10,
                                                   "extra": {"anchor": "animal"}})}  # fmt: skip
    settings = {"strategy": "ca", "iterations": args.iterations, "batch_size": args.batch,
                "precision": "float32"}  # fmt: skip
    split = make_cat_split()
    times = {"trainer": [], "reference": []}
    for _ in range(args.rounds):
        began = time.perf_counter()
        engine = Engine.from_settings(load_pipeline(model), {"ca": settings}, target="cat",
                                      split=split, seed=0, references=references)  # fmt: skip
        engine.train(progress=False)
        times["trainer"].append((time.perf_counter() - began) / args.iterations)
        began = time.perf_counter()
        train_ca(load_pipeline(model), latents, references["anchor"].prompts, "animal", "cat",
                 seed=0, iterations=args.iterations, lr=2e-6, batch=args.batch, prior=False)  # fmt: skip
        times["reference"].append((time.perf_counter() - began) / args.iterations)
    ratios = [r / t for t, r in zip(times["trainer"], times["reference"], strict=True)]
    out = {side: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
           for side, v in times.items()}  # fmt: skip
    out["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
