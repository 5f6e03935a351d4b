"""The erase job (rules `erase` and `erase_group`): build each method of a concept from its
params (crce.methods), let its class erase (train, solve or read), and write every method's
delta.safetensors and train.json."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import methods as registry
from .constants import TRAINER_VERSION
from .deltas import save_delta
from .modeling import device_for, load_pipeline
from .references import load_references
from .seeds import derive_seed
from .settings import TrainRuntime
from .training import TrainingError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What a method's `erase` works with: the loaded pipeline (no VAE unless a method trains on
    images) and the concept's split, seed and runtime."""

    pipe: object
    concept: dict  # id, text, category (from the split)
    split: object
    seed: int  # derived from (study seed, concept): every method of the concept shares it
    runtime: TrainRuntime
    checkpoint_dir: Path | None
    device: torch.device
    references: dict = field(default_factory=dict)


def versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {
        "crce": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def pipeline_dtype(settings, device: torch.device) -> torch.dtype:
    """bf16 weights only for a method trained in bf16 on a GPU; fp32 otherwise."""
    bf16 = getattr(settings, "precision", None) == "bfloat16" and device.type == "cuda"
    return torch.bfloat16 if bf16 else torch.float32


def run(
    *,
    methods: dict[str, dict],
    model: str,
    seed: int,
    runtime: dict,
    split_path: str,
    outputs: dict[str, str],
    checkpoint_dir: str,
    trainer_version: int = TRAINER_VERSION,
    references: dict[str, str] | None = None,
) -> None:
    """Erase one method, or a group that trains in one batched run, for the split's concept;
    `methods` and `outputs` are keyed by method name, `references` (the image sets they train
    on: name -> latents file) by the names the methods gave them."""
    from .lists import read_split

    if trainer_version != TRAINER_VERSION:
        raise TrainingError(
            f"the workflow planned trainer version {trainer_version}, this code is version "
            f"{TRAINER_VERSION}: rerun snakemake so the job is planned with this code"
        )
    if set(outputs) != set(methods):
        raise TrainingError(f"outputs for {sorted(outputs)}, settings for {sorted(methods)}")
    parsed = {m: registry.parse(params) for m, params in methods.items()}
    classes = {cls for cls, _ in parsed.values()}
    if len(parsed) > 1 and any(cls.kind is not registry.Kind.ITERATIVE for cls in classes):
        raise TrainingError("closed-form and external methods run one per job, not in a group")
    split = read_split(split_path)
    concept = {"id": split.id, "text": split.concept, "category": split.category}
    runtime = TrainRuntime(**runtime)
    seed = derive_seed(seed, concept["id"])  # every method of the concept: paired noise
    device = device_for(runtime.device)
    torch.manual_seed(seed)
    first_cls, first = next(iter(parsed.values()))
    pipe = load_pipeline(model, dtype=pipeline_dtype(first, device), device=device)
    pipe.vae = None  # erasure works in latent space
    log.info("erasing %r with %s", concept["text"], json.dumps(methods))
    instances = {
        m: cls(settings, target=concept["text"], split=split, seed=seed)
        for m, (cls, settings) in parsed.items()
    }
    job = Job(pipe, concept, split, seed, runtime,
              Path(checkpoint_dir) if checkpoint_dir else None, device,
              load_references(references or {}))  # fmt: skip
    began = time.perf_counter()
    results = first_cls.erase(job, instances)
    elapsed = time.perf_counter() - began
    provenance = {
        "trainer_version": TRAINER_VERSION,
        "device": str(device),
        "host": platform.node(),
        "versions": versions(),
    }
    for method, output in outputs.items():
        tensors, summary = results[method]
        summary.setdefault("wall_seconds", elapsed)
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_delta(tensors, output, method=method, concept=concept["id"],
                   extra=instances[method].delta_metadata())  # fmt: skip
        record = {
            "concept": concept,
            "method": method,
            "settings": methods[method],
            "model": model,
            "seed": seed,
            **provenance,
            **summary,
        }
        (output.parent / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        if "loss" in summary:
            log.info(
                "%s done: %d iterations in %.1f s (%.2f it/s), loss %.4g -> %.4g",
                method,
                summary["iterations"],
                summary["wall_seconds"],
                summary["it_per_s"] or 0,
                summary["loss"].get("first", float("nan")),
                summary["loss"].get("last", float("nan")),
            )
        else:
            log.info("%s done in %.1f s", method, summary["wall_seconds"])
