"""Ring-A-Bell's search: the fitness cache against the official fitness, which encodes the
whole population every generation (InversePrompt.ipynb cell 9), on an SD v1.4-size CLIP text
encoder with random weights (BENCHMARKS.md section 10). Both run the same search (same draws,
same result: checked), interleaved, `--repeats` times.

OMP_NUM_THREADS=2 python bench/attack.py --population 50 --generations 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from crce.attacks.ring_a_bell import Draws, Fitness, TokenFrame, genetic_search
from crce.settings import RingABellSettings


def sd14_text_encoder() -> CLIPTextModel:
    """SD v1.4's text encoder (openai/clip-vit-large-patch14's), random weights."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--population", type=int, default=200)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder = sd14_text_encoder()
    frame = TokenFrame(bos=49406, eos=49407, pad=49407, high=49406, length=77)
    target = torch.randn(77, 768, generator=torch.Generator().manual_seed(1))

    def run(cache: bool) -> tuple[float, int, tuple]:
        settings = RingABellSettings(population=args.population, generations=args.generations,
                                     length=args.length, cache=cache)  # fmt: skip
        fitness = Fitness(encoder, target, frame, cache=cache)
        began = time.perf_counter()
        found = genetic_search(fitness, k=args.length, high=frame.high, settings=settings,
                               draws=Draws(0))  # fmt: skip
        return time.perf_counter() - began, fitness.encoded, found.tokens

    times: dict[str, list[float]] = {"official": [], "cached": []}
    encoded, tokens = {}, {}
    for _ in range(args.repeats):
        for name, cache in (("official", False), ("cached", True)):
            seconds, encoded[name], tokens[name] = run(cache)
            times[name].append(seconds)
    assert tokens["official"] == tokens["cached"], "the cache changed the search"
    base = statistics.median(times["official"])
    print(f"population {args.population}, {args.generations} generations, K {args.length}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:8s} median {median:7.2f} s  spread {min(values):.2f}-{max(values):.2f}  "
              f"encodes {encoded[name]:6d}  speed-up {base / median:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
