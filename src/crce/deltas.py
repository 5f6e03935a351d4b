"""Delta files: the trained tensors of one (method, concept), with diffusers UNet names, read
by the sampler, the export and anyone with an SD pipeline:

    pipe.unet.load_state_dict(safetensors.torch.load_file(path), strict=False)

Tensors named under `adapter.` (ADAPTER_PREFIX) are not UNet weights: what a method's
sampling hook reads (SPM's adapter factors and transport scorer); the loaders skip them.
A tensor changed at some entries only (SalUn's, by its mask) is stored sparse, under
`sparse.` (SPARSE_PREFIX): `sparse.{name}.mask`, its entries as packed bits, and
`sparse.{name}.value`, their values; `unet_tensors` makes them whole again.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import honour_umask

ADAPTER_PREFIX = "adapter."
SPARSE_PREFIX = "sparse."


def sparse(name: str, tensor, mask) -> dict:
    """`tensor`'s entries where `mask` holds, as two delta tensors (nothing where none does)."""
    import numpy as np
    import torch

    flat = mask.flatten().bool()
    if not flat.any():
        return {}
    bits = torch.from_numpy(np.packbits(flat.cpu().numpy()))
    value = tensor.flatten()[flat.to(tensor.device)].contiguous()
    return {f"{SPARSE_PREFIX}{name}.mask": bits, f"{SPARSE_PREFIX}{name}.value": value}


def unet_tensors(tensors: dict, unet) -> dict:
    """The UNet weights a delta sets: its plain tensors, and its sparse ones written into
    copies of the UNet's own; adapter tensors are left out."""
    import numpy as np
    import torch

    whole = {k: v for k, v in tensors.items() if not k.startswith((ADAPTER_PREFIX, SPARSE_PREFIX))}
    own = dict(unet.named_parameters())
    for key in tensors:
        if not (key.startswith(SPARSE_PREFIX) and key.endswith(".mask")):
            continue
        name = key[len(SPARSE_PREFIX) : -len(".mask")]
        if name not in own:
            raise ValueError(f"sparse tensor {name!r} is not in the UNet")
        base = own[name].detach()
        bits = np.unpackbits(tensors[key].numpy(), count=base.numel()).astype(bool)
        dense = base.flatten().clone()
        dense[torch.from_numpy(bits).to(dense.device)] = tensors[f"{SPARSE_PREFIX}{name}.value"].to(
            dense
        )
        whole[name] = dense.view_as(base)
    return whole


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
