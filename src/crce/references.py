"""Image sets a method trains on (its `references()`): what decides a set, its key and how
an erase job reads it. The `reference_images` rule draws each set once from the base model
(crce.sample.run_references), as PNGs (what a mask model or a reader sees) and their VAE
latents (what a trainer reads).

A set is named by a digest of everything that decides its images (model, prompts, counts,
sampler, seed; not the name a method gives it), so two methods asking for the same images
share one job and one folder: `results/references/{key}/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .methods import ReferenceRequest
from .settings import SampleSettings

LATENTS = "latents"  # the tensor's name in latents.safetensors
MASKS = "masks"  # the set's masks, when its request asks for them (crce.masks)
PARAMS = "params"  # its metadata key: the set's params as JSON (prompts, counts, extra)


@dataclass(frozen=True)
class ReferenceSet:
    """One set as a trainer reads it: latents in drawing order (prompt by prompt, then image)
    and what decided them."""

    latents: object  # torch.Tensor [n, C, h, w]
    params: dict
    masks: object = None  # torch.Tensor [n, H, W] uint8 (1: the concept), if requested

    @property
    def prompts(self) -> list[str]:
        """The prompt of each image, in the latents' order."""
        per = self.params["images_per_prompt"]
        return [p for p in self.params["prompts"] for _ in range(per)]

    @property
    def extra(self) -> dict:
        return self.params.get("extra", {})


def request_params(request: ReferenceRequest, *, model: str, sample: SampleSettings,
                   concept_id: str) -> dict:  # fmt: skip
    """What decides a set's images, as plain builtins (the rule's params; the key's source).
    An unset resolution is the study's sampling resolution, the precision always is. Prompts
    from a split name it (`split`): the job reads them from `results/splits/{concept}.json`."""
    from_split = None
    if request.from_split:
        from_split = {"concept": concept_id, "group": request.from_split,
                      "template": request.template}  # fmt: skip
    params = {
        "model": model,
        "prompts": list(request.prompts),
        "images_per_prompt": request.images_per_prompt,
        "steps": request.steps,
        "guidance": request.guidance,
        "resolution": request.resolution or sample.resolution,
        "scheduler": request.scheduler,
        "precision": sample.precision,
        "seed": request.seed,
        "extra": json.loads(json.dumps(request.extra)),
        "split": from_split,
    }
    if request.masks:  # as the anchor: only then, the keys of other sets unchanged
        params["masks"] = dict(request.masks)
    if request.from_anchor:  # only then: the keys of every other set stay what they were
        params["anchor"] = {"concept": concept_id, "key": request.from_anchor,
                            "captions": request.anchor_captions}  # fmt: skip
    return params


def split_file(params: dict) -> str | None:
    """The split a set's prompts come from (None for prompts given outright)."""
    return f"results/splits/{params['split']['concept']}.json" if params.get("split") else None


def anchor_file(params: dict) -> str | None:
    """The LLM anchor a set reads (None for a set without one)."""
    return f"results/anchors/{params['anchor']['concept']}.json" if params.get("anchor") else None


def read_anchor(path: str | None) -> dict:
    """An `anchor` job's answer (crce.anchors)."""
    if not path or not Path(path).is_file():
        raise ValueError(f"the LLM's anchor file {path} is missing: rerun its `anchor` job")
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resolved_prompts(params: dict, split_path: str | None = None,
                     anchor_path: str | None = None) -> dict:  # fmt: skip
    """The params with what the LLM's anchor and the split give (unchanged without them)."""
    if params.get("anchor"):
        spec, found = params["anchor"], read_anchor(anchor_path)
        params = {**params, "extra": {**params["extra"], spec["key"]: found["anchor"]}}
        if spec["captions"]:
            params["prompts"] = found["captions"][: spec["captions"]]
    if not params.get("split"):
        return params
    from .lists import read_split

    split = read_split(split_path)
    spec = params["split"]
    prompts = [spec["template"].format(item.text) for _, item in split.items(spec["group"])]
    if not prompts:
        raise ValueError(f"{split_path}: no {spec['group']} items to draw reference images of")
    return {**params, "prompts": prompts}


def reference_key(params: dict) -> str:
    """The set's folder name: equal params, one key (16 hex digits of their sha256)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_references(paths: dict[str, str]) -> dict[str, ReferenceSet]:
    """Each set a job's methods train on, by the name they gave it."""
    from safetensors import safe_open

    from .files import damaged, rebuild_hint

    loaded = {}
    for name, path in paths.items():
        try:
            with safe_open(path, framework="pt") as file:
                params = json.loads(file.metadata()[PARAMS])
                masks = file.get_tensor(MASKS) if MASKS in file.keys() else None
                loaded[name] = ReferenceSet(file.get_tensor(LATENTS), params, masks)
        except Exception as err:  # SafetensorError, OSError, KeyError, JSONDecodeError
            raise damaged(path, err, rebuild_hint(path)) from None
    return loaded
