"""Attention paths for the toy sampler on CPU, interleaved (BENCHMARKS.md section 6).

OMP_NUM_THREADS=1 python bench/toy_attention.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from crce.modeling import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resources/toy/sd")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)

    def sample() -> float:
        generators = [torch.Generator().manual_seed(i) for i in range(args.images)]
        began = time.perf_counter()
        pipe(["a red circle"] * args.images, num_inference_steps=args.steps, guidance_scale=5.0,
             height=32, width=32, generator=generators, output_type="np")  # fmt: skip
        return time.perf_counter() - began

    times: dict[str, list[float]] = {"sdpa": [], "classic": [], "sdpa-math": []}
    for _ in range(args.repeats):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        times["sdpa"].append(sample())
        pipe.unet.set_attn_processor(AttnProcessor())
        times["classic"].append(sample())
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        with sdpa_kernel(SDPBackend.MATH):
            times["sdpa-math"].append(sample())
    base = statistics.median(times["sdpa"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:10s} median {median:.2f} s  ({median / base:.2f}x)  runs {values}")


if __name__ == "__main__":
    main()
