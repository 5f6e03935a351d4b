"""CA, SalUn, FMN and MACE: the engine's trainer vs the official loop's pattern
(tests/reference_ca.py, tests/reference_salun.py, tests/reference_fmn.py,
tests/reference_mace.py: a deep-copied UNet, prompts encoded at every step, separate calls),
whole runs (SalUn's mask pass, FMN's inversion of as many steps, MACE's refinement and fusion
included) of the same iterations on the same latents, the two sides alternated in one process
so the machine's noise hits both alike.

    python bench/fine_tune_step.py --method ca --rounds 5 --iterations 20      # tiny CPU model
    python bench/fine_tune_step.py --method salun --rounds 5 --iterations 20
    python bench/fine_tune_step.py --method fmn --rounds 5 --iterations 20     # batch 1
    python bench/fine_tune_step.py --method mace --rounds 5 --iterations 50    # batch 1
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
from reference_fmn import forget, invert  # noqa: E402
from reference_mace import mace as naive_mace  # noqa: E402
from reference_salun import train_salun  # noqa: E402

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
    parser.add_argument("--method", choices=["ca", "salun", "fmn", "mace"], default="ca")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = str(build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny-sd", seed=0))
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size
    latents = torch.randn(
        (len(PROMPTS) * 10, 4, size, size), generator=torch.Generator().manual_seed(0)
    )
    remain = torch.randn((40, 4, size, size), generator=torch.Generator().manual_seed(1))
    if args.method == "ca":
        references = {"anchor": ReferenceSet(latents, {"prompts": PROMPTS, "images_per_prompt": 10,
                                                       "extra": {"anchor": "animal"}})}  # fmt: skip
    elif args.method == "mace":
        latents = latents[:8]
        masks = torch.zeros((8, size * 8, size * 8), dtype=torch.uint8)
        masks[:, 4:24, 4:28] = 1
        references = {"instances": ReferenceSet(latents, {"prompts": ["a photo of the cat"],
                                                          "images_per_prompt": 8}, masks)}  # fmt: skip
    elif args.method == "fmn":
        args.batch = 1  # its official batch; the loop's pattern has no other
        latents = latents[:10]
        references = {"instances": ReferenceSet(latents, {"prompts": ["a photo of cat"],
                                                          "images_per_prompt": 10})}  # fmt: skip
    else:
        references = {
            "forget": ReferenceSet(latents, {"prompts": ["an image of a cat"], "images_per_prompt": 100}),
            "remain": ReferenceSet(remain, {"prompts": [f"an image of a dog {k}" for k in range(10)],
                                            "images_per_prompt": 4, "extra": {"pseudo": "animal"}}),
        }  # fmt: skip
    settings = {"strategy": args.method, "iterations": args.iterations, "batch_size": args.batch,
                "precision": "float32"}  # fmt: skip
    if args.method == "fmn":
        settings["ti_iterations"] = args.iterations
    if args.method == "mace":
        del settings["batch_size"]
        settings["categories"] = {"object": {"lamb": 10.0, "lr": 1e-3}}
    split = make_cat_split()
    mace_prompts = {}

    def trainer():
        if args.method != "mace":
            engine = Engine.from_settings(load_pipeline(model), {args.method: settings},
                                          target="cat", split=split, seed=0,
                                          references=references)  # fmt: skip
            engine.train(progress=False)
            return
        from crce import methods as registry
        from crce.erase import Job
        from crce.methods.mace import augmented_prompts

        cls, parsed = registry.parse(settings)
        method = cls(parsed, target="cat", split=split, seed=0)
        job = Job(pipe=load_pipeline(model), concept={"id": "cat", "text": "cat",
                  "category": "object"}, split=split, seed=0, runtime=None,
                  checkpoint_dir=None, device=torch.device("cpu"), references=references)  # fmt: skip
        cls.erase(job, {"mace": method})
        mace_prompts["olds"] = method.olds
        mace_prompts["news"] = augmented_prompts("ground", "object", parsed, 0)

    def reference():
        if args.method == "ca":
            train_ca(load_pipeline(model), latents, references["anchor"].prompts, "animal", "cat",
                     seed=0, iterations=args.iterations, lr=2e-6, batch=args.batch, prior=False)  # fmt: skip
        elif args.method == "mace":
            found = references["instances"]
            naive_mace(load_pipeline(model), found.latents, found.masks, mace_prompts["olds"],
                       mace_prompts["news"], "cat", seed=0, steps=args.iterations, lr=1e-3,
                       lamb=10.0)  # fmt: skip
        elif args.method == "fmn":
            pipe = load_pipeline(model)
            tokenizer, encoder, _ = invert(pipe, latents, "cat", seed=0, steps=args.iterations)
            forget(pipe, latents, "a photo of <s1><s2><s3><s4>", "<s1><s2><s3><s4>", seed=0,
                   steps=args.iterations, lr=2e-6, tokenizer=tokenizer, encoder=encoder)  # fmt: skip
        else:
            f, r = references["forget"], references["remain"]
            train_salun(load_pipeline(model), f.latents, f.prompts, r.latents, r.prompts,
                        "an image of a animal", seed=0, iterations=args.iterations, lr=1e-5,
                        batch=args.batch, alpha=0.5)  # fmt: skip

    times = {"trainer": [], "reference": []}
    for _ in range(args.rounds):
        began = time.perf_counter()
        trainer()
        times["trainer"].append((time.perf_counter() - began) / args.iterations)
        began = time.perf_counter()
        reference()
        times["reference"].append((time.perf_counter() - began) / args.iterations)
    ratios = [r / t for t, r in zip(times["trainer"], times["reference"], strict=True)]
    out = {side: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
           for side, v in times.items()}  # fmt: skip
    out["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
