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

from .files import honour_umask
from .sample import load_erased_pipeline, method_sampling_of, set_scheduler
from .settings import SampleSettings

log = logging.getLogger(__name__)


def export(
    model: str,
    delta: str | None,
    settings: SampleSettings,
    output: str | Path,
    record: dict,
    sampling: dict | None = None,
) -> Path:
    """Save base + delta with the sampler `settings.scheduler` to `output`; a method that
    changes its pipeline at sampling time (SLD) saves that pipeline, and what its calls add is
    recorded in crce_export.json (a pipeline folder cannot hold it)."""
    pipe = load_erased_pipeline(model, delta, dtype=torch.float32, device="cpu")
    method_sampling = method_sampling_of(sampling, delta)
    if method_sampling:
        pipe = method_sampling.export_pipeline(pipe)
        record = {**record, "call_kwargs": method_sampling.call_kwargs(),
                  "sampling": {k: v for k, v in sampling.items() if k != "split"}}  # fmt: skip
        if hasattr(pipe, "safety_concept"):
            record["safety_concept"] = pipe.safety_concept
    caveat = method_sampling.export_caveat() if method_sampling else None
    if caveat:
        record = {**record, "caveat": caveat}
    scheduler = set_scheduler(pipe, settings.scheduler)
    output = Path(output)
    pipe.save_pretrained(output, safe_serialization=True)
    if caveat:  # in the folder itself, where a user of the pipeline looks
        (output / "CAVEAT.txt").write_text(caveat + "\n")
    honour_umask(output)  # a lab shares its models: the user's umask, not owner-only
    provenance = {**record, "base_model": model, "delta": delta, "scheduler": scheduler}
    (output / "crce_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("exported %s (+ %s) to %s", model, delta or "no delta", output)
    return output


def run(*, model: str, delta: str | None, settings: dict, output: str, record: dict,
        sampling: dict | None = None) -> None:  # fmt: skip
    export(model, delta, SampleSettings(**settings), output, record, sampling)
