"""Delta files: the trained tensors of one (method, concept), with diffusers UNet names, read
by the sampler, the export and anyone with an SD pipeline:

    pipe.unet.load_state_dict(safetensors.torch.load_file(path), strict=False)

Tensors named under `adapter.` (ADAPTER_PREFIX) are not UNet weights: what a method's
sampling hook reads (SPM's adapter factors and transport scorer); the loaders skip them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import honour_umask

ADAPTER_PREFIX = "adapter."


def save_delta(tensors: dict, path: str | Path, *, method: str, concept: str,
               extra: dict | None = None) -> None:  # fmt: skip
    """A delta file whose bytes depend on its contents alone: safetensors writes a metadata
    dict in hash order, so two keys would land in either order and the same tensors would
    hash differently (the sampler's fingerprint then discards finished images). One key;
    `extra` (what a method's sampling hook reads) goes inside it."""
    from safetensors.torch import save_file

    record = {"concept": concept, "method": method, **(extra or {})}
    metadata = {"crce": json.dumps(record, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)  # safetensors writes owner-only files


def delta_record(path: str | Path) -> dict:
    """The record save_delta wrote into a delta's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads((handle.metadata() or {}).get("crce", "{}"))
