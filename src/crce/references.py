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

from .methods import ReferenceRequest
from .settings import SampleSettings

LATENTS = "latents"  # the tensor's name in latents.safetensors
PARAMS = "params"  # its metadata key: the set's params as JSON (prompts, counts, extra)


@dataclass(frozen=True)
class ReferenceSet:
    """One set as a trainer reads it: latents in drawing order (prompt by prompt, then image)
    and what decided them."""

    latents: object  # torch.Tensor [n, C, h, w]
    params: dict

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
    return {
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


def split_file(params: dict) -> str | None:
    """The split a set's prompts come from (None for prompts given outright)."""
    return f"results/splits/{params['split']['concept']}.json" if params.get("split") else None


def resolved_prompts(params: dict, split_path: str | None = None) -> dict:
    """The params with the prompts a split gives (unchanged without one)."""
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
                loaded[name] = ReferenceSet(file.get_tensor(LATENTS), params)
        except Exception as err:  # SafetensorError, OSError, KeyError, JSONDecodeError
            raise damaged(path, err, rebuild_hint(path)) from None
    return loaded
