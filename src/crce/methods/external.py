"""Weights made elsewhere as a method (MACE's official outputs, ESD's, anyone's): read a
checkpoint and keep the UNet tensors that differ from the base model, as a delta that the
sampler loads like a trained one. Nothing trains.

Formats (`format: auto` tells them apart by what the path holds):
- `pipeline`: a diffusers pipeline folder (model_index.json, unet/);
- `unet`: a diffusers UNet folder (config.json + weights);
- `safetensors`: a state dict with diffusers UNet names (a `unet.` prefix is dropped);
- `crce-pt`: the official CRCE code's `torch.save(finetuner.state_dict())`: a dict of module
  name (`unet.down_blocks...attn2.to_q`, from StableDiffuser.named_modules) -> that module's
  state dict (`weight`, `bias`), as `FineTunedModel.state_dict` in its `sd_utils.py` builds it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..digests import files_sha256
from .base import Kind, Method, MethodSettings

log = logging.getLogger(__name__)


class ExternalError(ValueError):
    """A checkpoint that is missing or does not fit the base model."""


class ExternalSettings(MethodSettings):
    strategy: str = "external"
    path: str = Field(
        pattern="[{]concept[}]",
        description="the checkpoint of each concept (`{concept}` is its id; a missing one "
        "fails that concept's job, naming it)",
    )
    format: Literal["auto", "unet", "pipeline", "safetensors", "crce-pt"] = Field(
        "auto",
        description="`auto`, `pipeline`, `unet`, `safetensors`, `crce-pt` (the official CRCE "
        "`torch.save` of `{module: state dict}`)",
    )


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline"
        if (path / "config.json").is_file():
            return "unet"
        raise ExternalError(f"{path}: a folder with neither model_index.json nor config.json")
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return "crce-pt"
    raise ExternalError(f"{path}: cannot tell its format; set the method's `format`")


def read_tensors(path: Path, fmt: str) -> dict:
    """UNet tensors with diffusers names."""
    if fmt in ("pipeline", "unet"):
        from diffusers import UNet2DConditionModel

        subfolder = "unet" if fmt == "pipeline" else None
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=subfolder)
        return unet.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import load_file

        return {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise ExternalError(f"{path}: expected {{module name: module state dict}} (crce-pt)")
    return {
        f"{module.removeprefix('unet.')}.{key}": tensor
        for module, tensors in state.items()
        for key, tensor in tensors.items()
    }


class External(Method):
    """A checkpoint per concept at `path`, turned into this pipeline's delta."""

    name = "external"
    kind = Kind.EXTERNAL
    Settings = ExternalSettings

    def checkpoint(self, concept_id: str) -> Path:
        return Path(self.settings.path.format(concept=concept_id))

    @classmethod
    def job_inputs(cls, settings, concept_id):
        """The checkpoint, once it exists (a new one reruns the job)."""
        path = Path(settings.path.format(concept=concept_id))
        return [str(path)] if path.exists() else []

    def read(self, unet, concept: dict) -> tuple[dict, dict]:
        """The checkpoint's tensors that differ from `unet`'s, and a record of where they came
        from. A missing file or a tensor the base model lacks is an error naming it."""
        import torch

        path = self.checkpoint(concept["id"])
        if not path.exists():
            raise ExternalError(
                f"concept {concept['text']!r} ({concept['id']}): no checkpoint at {path} "
                f"(method path {self.settings.path!r})"
            )
        fmt = detect_format(path) if self.settings.format == "auto" else self.settings.format
        tensors = read_tensors(path, fmt)
        base = unet.state_dict()
        delta = {}
        for name, tensor in tensors.items():
            if name not in base:
                raise ExternalError(f"{path}: tensor {name!r} is not in the base model's UNet")
            if tensor.shape != base[name].shape:
                raise ExternalError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the base model "
                    f"{tuple(base[name].shape)}"
                )
            if not torch.equal(tensor.to(base[name].dtype), base[name]):
                delta[name] = tensor.float().contiguous()
        if not delta:
            raise ExternalError(f"{path}: every tensor equals the base model's: nothing was erased")
        files = [f for f in sorted(path.rglob("*")) if f.is_file()] if path.is_dir() else [path]
        record = {"source": str(path), "format": fmt, "sha256": files_sha256(files)}
        record["changed_tensors"] = len(delta)
        log.info("%s (%s): %d of %d UNet tensors differ", path, fmt, len(delta), len(tensors))
        return delta, record

    @classmethod
    def erase(cls, job, methods):
        ((name, method),) = methods.items()
        delta, record = method.read(job.pipe.unet, job.concept)
        return {name: (delta, {"external": record})}
