"""An erased model people can load: the base pipeline with a method's delta merged in, saved
as a full diffusers folder (safetensors, with the evaluation sampler as its scheduler).

    pipe = StableDiffusionPipeline.from_pretrained("results/export/crce/cat")

gives the images the workflow's sampler draws for the same seeds and batch composition.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .sample import load_erased_pipeline, set_scheduler
from .settings import SampleSettings

log = logging.getLogger(__name__)


def export(
    model: str, delta: str | None, settings: SampleSettings, output: str | Path, record: dict
) -> Path:
    """Save base + delta with the sampler `settings.scheduler` to `output`."""
    pipe = load_erased_pipeline(model, delta, dtype=torch.float32, device="cpu")
    scheduler = set_scheduler(pipe, settings.scheduler)
    output = Path(output)
    pipe.save_pretrained(output, safe_serialization=True)
    provenance = {**record, "base_model": model, "delta": delta, "scheduler": scheduler}
    (output / "crce_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("exported %s (+ %s) to %s", model, delta or "no delta", output)
    return output


def run(*, model: str, delta: str | None, settings: dict, output: str, record: dict) -> None:
    export(model, delta, SampleSettings(**settings), output, record)
