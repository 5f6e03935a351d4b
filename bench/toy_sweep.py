"""Erasure settings on the toy world, judged by its shape classifier (no Snakemake, no server).

    python bench/toy_sweep.py --concept circle --setting esd:lr=1e-3,iterations=60 \
        --setting crce:lr=1e-3,iterations=60,beta=4

Per setting: train one delta with `crce.training.engine.Engine` (the workflow's trainer) on the toy
concept's split, sample each probe prompt with the workflow's sampler settings and print the
share of images the classifier reads as the prompt's own shape, plus what the others became.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from crce.modeling import load_pipeline
from crce.sample import set_scheduler
from crce.split import make_split
from crce.training.engine import Engine
from crce_worlds.toy.classifier import load_classifier
from crce_worlds.toy.world import as_lists, relatives, shape_of


def parse_setting(text: str) -> tuple[str, dict]:
    strategy, _, rest = text.partition(":")
    values = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        values[key] = json.loads(value) if value[:1] in "[{tf" else float(value)
        if key in ("iterations", "ddim_steps", "n_corefs", "n_retains"):
            values[key] = int(values[key])
    return strategy, values


@torch.no_grad()
def probe(pipe, classifier, classes, prompts, images, steps, guidance) -> dict:
    rows = {}
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(7000 + k) for k in range(images)]
        out = pipe([prompt] * images, num_inference_steps=steps, guidance_scale=guidance,
                   height=32, width=32, generator=generators, output_type="np").images  # fmt: skip
        pred = classifier(torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1).argmax(1).tolist()
        seen = Counter(classes[p] for p in pred)
        rows[prompt] = (seen[shape_of(prompt)] / images, dict(seen.most_common(3)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--weights", default="resources/toy")
    parser.add_argument("--setting", action="append", default=[], help="strategy:key=value,...")
    parser.add_argument("--probe", nargs="*", default=None, help="prompts (default: a mix)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = load_pipeline(f"{args.weights}/sd")
    set_scheduler(pipe, "ddim")  # the workflow's sampler (the toy ships SD v1.4's PNDM config)
    classifier, classes = load_classifier(args.weights)
    split = make_split(as_lists(args.concept, args.concept), seed=args.seed)
    prompts = args.probe or [
        args.concept,
        *[i.text for i in split.coref_train[:2]],
        *[i.text for i in split.coref_test[:2]],
        *[i.text for i in split.retain_train],
        *[i.text for i in split.retain_test],
    ]
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    results = {
        "base": probe(pipe, classifier, classes, prompts, args.images, args.steps, args.guidance)
    }
    for text in args.setting:
        strategy, values = parse_setting(text)
        settings = {"strategy": strategy, "precision": "float32", **values}
        began = time.perf_counter()
        Engine.from_settings(pipe, {strategy: settings}, target=args.concept, split=split,
                             seed=args.seed).train(progress=False)  # fmt: skip
        trained_s = time.perf_counter() - began
        results[f"{text} ({trained_s:.0f} s)"] = probe(
            pipe, classifier, classes, prompts, args.images, args.steps, args.guidance
        )
        pipe.unet.load_state_dict(original)
    retains = {i.text for i in split.retain_train + split.retain_test}
    close = {t for t in retains if shape_of(t) in relatives(args.concept)}
    corefs = {i.text for i in split.coref_train + split.coref_test}
    for name, rows in results.items():

        def mean(texts, rows=rows):
            return sum(rows[p][0] for p in texts) / max(1, len(texts))

        summary = {
            "setting": name,
            "target": mean([p for p in prompts if p == args.concept]),
            "corefs": mean([p for p in prompts if p in corefs]),
            "close_retains": mean([p for p in prompts if p in close]),
            "far_retains": mean([p for p in prompts if p in retains - close]),
        }
        print(f"\n== {json.dumps(summary)}")
        for prompt, (rate, seen) in rows.items():
            mark = "C" if prompt in close else "R" if prompt in retains else " "
            print(f"  {mark} {prompt:18s} {rate:.2f}  {seen}")


if __name__ == "__main__":
    main()
