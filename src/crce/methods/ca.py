"""Concept Ablation, CA (Kumari et al., ICCV 2023), as its diffusers code trains it
(nupurkmr9/concept-ablation at c11fb1b, diffusers/train.py and diffusers/utils.py).

CA fine-tunes attn2 K/V so that the target's prompt predicts, on images of an *anchor*
concept (the target's category: "Grumpy Cat" -> "cat"), what the anchor's prompt predicts:
the model-based loss `|eps(x_t, c_target) - sg(eps(x_t, c_anchor))|^2` (train.py L1096-1149,
the anchor prediction by the model being trained, under no_grad), or, as a knob, the
noise-based one `|eps(x_t, c_target) - eps|^2`. When the anchor's words are words of the target's
("grumpy cat" holds "cat") its README adds `--with_prior_preservation`: the anchor's images
under the anchor's prompts keep denoising (`prior_loss_weight` x MSE to the noise).

The anchor images come from the base model through the `reference_images` rule, drawn as
train.py L720-735 draws its class images (DPM-Solver, 25 steps, guidance 6); the target's
prompt of each image is its anchor prompt with the anchor replaced by the target
(utils.py L197-199). The anchor of each concept comes from a curated file (`anchors`),
checked (not empty, not the target; not a coref, at erase time), or with `anchors: llm` from
the lists' LLM with its captions (crce.anchors, the `anchor` rule); it is recorded with the
delta.

Randomness per iteration k, in this order from the engine's generator: the horizontal flips
of the batch's instance images then of its prior images (`hflip`), the noise, the timesteps.
Which images a batch holds follows the official data loader: each epoch is a fresh
permutation of the dataset (seeded by the concept's seed and the epoch), and dataset item j
is instance image `fixed[j]` (utils.py L132 shuffles the instance list once) with prior
image j.
"""

from __future__ import annotations

import csv
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..seeds import derive_seed
from .base import IterativeMethod, IterativeSettings, ReferenceRequest

# CA-style captions that hold the anchor's word (its LLM prompt asks for "captions for images
# containing a {anchor}"; utils.py L395-407); `anchor_prompts` replaces them.
CAPTIONS = (
    "a photo of a {anchor}",
    "a {anchor} in a garden",
    "a close-up photo of a {anchor}",
    "a {anchor} on a city street",
    "a painting of a {anchor}",
    "a {anchor} in the snow",
    "a black and white photo of a {anchor}",
    "a {anchor} in a room",
    "a {anchor} at the beach",
    "a drawing of a {anchor}",
)


class AnchorError(ValueError):
    """A concept without a usable anchor: the message names the concept and the file."""


class CaSettings(IterativeSettings):
    lr: float = Field(2e-6, gt=0, description="AdamW learning rate before scaling (official 2e-6)")
    scale_lr: bool = Field(
        True,
        description="`--scale_lr`: lr x batch_size, x 2 with prior preservation (train.py "
        "L861-868; its README's runs set it)",
    )
    iterations: int = Field(
        100,
        ge=1,
        description="optimiser steps (official README: 100 on 2 GPUs of batch 4, 200 on one)",
    )
    batch_size: int = Field(
        8, ge=1, description="images per step (official: 4 per GPU, 2 GPUs recommended)"
    )
    loss: Literal["model-based", "noise-based"] = Field(
        "model-based",
        description="`model-based` (official default): pull to the anchor prompt's prediction; "
        "`noise-based`: to the true noise",
    )
    prior_preservation: Literal["auto", "on", "off"] = Field(
        "auto",
        description="the anchor images' own denoising loss: `auto` when the anchor's words are "
        "whole words of the target's (official README), `on`, `off`",
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="its weight (official 1.0)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (official 1e-2)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (official 1.0)")
    hflip: bool = Field(
        True,
        description="flip each image with probability 0.5 (`--hflip`; here the latent is "
        "flipped, not the image before encoding)",
    )
    anchors: str = Field(
        "resources/anchors.tsv",
        description="curated TSV (columns concept, anchor): each target's anchor concept; "
        "`llm`: asked of the lists' LLM (rule `anchor`), with its captions",
    )
    anchor_captions: int = Field(
        200,
        ge=1,
        description="with `anchors: llm`: captions the LLM writes, the anchor images spread over "
        "them (official 200; `anchor_prompts` are then not used)",
    )
    anchor_prompts: tuple[str, ...] = Field(
        CAPTIONS,
        min_length=1,
        description="captions of the anchor images, each with `{anchor}` (CA asks an LLM for "
        "200 captions holding the anchor's word)",
    )
    anchor_images: int = Field(
        1000, ge=1, description="anchor images, spread over the captions (official 1,000)"
    )
    anchor_steps: int = Field(25, ge=1, description="their DPM-Solver steps (official 25)")
    anchor_guidance: float = Field(6.0, description="their guidance scale (official 6.0)")

    @field_validator("anchor_prompts")
    @classmethod
    def _each_holds_the_anchor(cls, prompts):
        # The target's prompt is the caption with the anchor replaced (utils.py L197-199): a
        # caption without it would train the target on a prompt that does not name it.
        missing = [p for p in prompts if "{anchor}" not in p]
        if missing:
            raise ValueError(f"each caption needs `{{anchor}}`; these lack it: {missing}")
        return prompts


@lru_cache(maxsize=8)
def _read_anchors(path: str, mtime: float) -> dict[str, str]:
    where = Path(path)
    if not where.is_file():
        raise AnchorError(f"anchors file {path} does not exist (methods.*.anchors)")
    anchors: dict[str, str] = {}
    with where.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        if not {"concept", "anchor"} <= set(reader.fieldnames or []):
            raise AnchorError(f"{path}: needs the columns concept and anchor")
        for line, row in enumerate(reader, start=2):
            concept, anchor = (row["concept"] or "").strip(), (row["anchor"] or "").strip()
            if not concept or not anchor:
                raise AnchorError(f"{path} line {line}: a concept and its anchor, both non-empty")
            if concept in anchors:
                raise AnchorError(f"{path} line {line}: {concept!r} is listed twice")
            if anchor.casefold() == concept.casefold():
                raise AnchorError(f"{path} line {line}: {concept!r} is its own anchor")
            anchors[concept] = anchor
    return anchors


def anchor_for(path: str, concept: dict) -> str:
    """The anchor of `concept` (by its text, else its id) in the curated file."""
    anchors = _read_anchors(path, Path(path).stat().st_mtime if Path(path).exists() else 0.0)
    for key in (concept["text"], concept["id"]):
        if key in anchors:
            return anchors[key]
    raise AnchorError(
        f"{concept['text']!r} has no anchor in {path}: add a row `{concept['text']}<TAB>anchor`"
    )


def overlaps(anchor: str, target: str) -> bool:
    """The anchor's words are words of the target's ("grumpy cat" holds "cat"; "Batman"
    does not hold "man")."""
    return re.search(rf"\b{re.escape(anchor.casefold())}\b", target.casefold()) is not None


class ConceptAblation(IterativeMethod):
    """CA on attn2 K/V (its `--parameter_group cross-attn`): one method per job."""

    name = "ca"
    Settings = CaSettings
    section = "ca"
    optimizer = "AdamW"

    @classmethod
    def references(cls, settings, concept):
        from ..constants import LLM_ANCHORS as LLM

        if settings.anchors == LLM:  # the anchor and captions come with the job's inputs
            return [
                ReferenceRequest(
                    "anchor",
                    (),
                    math.ceil(settings.anchor_images / settings.anchor_captions),
                    steps=settings.anchor_steps,
                    guidance=settings.anchor_guidance,
                    scheduler="dpmsolver",
                    from_anchor="anchor",
                    anchor_captions=settings.anchor_captions,
                )
            ]
        anchor = anchor_for(settings.anchors, concept)
        prompts = tuple(dict.fromkeys(t.format(anchor=anchor) for t in settings.anchor_prompts))
        per_prompt = math.ceil(settings.anchor_images / len(prompts))
        return [
            ReferenceRequest(
                "anchor",
                prompts,
                per_prompt,
                steps=settings.anchor_steps,
                guidance=settings.anchor_guidance,
                scheduler="dpmsolver",
                extra={"anchor": anchor},
            )
        ]

    @classmethod
    def objective(cls, engine, methods):
        return AblationObjective(engine, methods)

    def prepare(self, engine) -> None:
        super().prepare(engine)
        from ..training import TrainingError

        corefs = {i.text.casefold() for _, i in self.split.items("coref")} if self.split else set()
        if self.anchor.casefold() in corefs:
            raise TrainingError(
                f"{self.target}: its anchor {self.anchor!r} is one of its corefs: erasing the "
                "target into it would erase nothing; choose another in "
                f"{self.settings.anchors}"
            )
        mode = self.settings.prior_preservation
        self.prior = mode == "on" or (mode == "auto" and overlaps(self.anchor, self.target))

    def optimizer_kwargs(self):
        s = self.settings
        lr = s.lr * (s.batch_size * (2 if self.prior else 1) if s.scale_lr else 1)
        return {"lr": lr, "betas": (0.9, 0.999), "weight_decay": s.weight_decay, "eps": 1e-8}

    def max_grad_norm(self):
        return self.settings.max_grad_norm

    def delta_metadata(self):
        return {"anchor": self.anchor, "prior_preservation": self.prior,
                "lr": self.optimizer_kwargs()["lr"]}  # fmt: skip


def interior_mask(height: int, width: int):
    """The valid-region mask of an image at the training size (utils.py L165-175 with no
    resize augmentation): the latent grid without its outer ring."""
    import torch

    mask = torch.zeros(1, 1, height, width)
    mask[..., 1 : height - 1, 1 : width - 1] = 1.0
    return mask


class AblationObjective:
    """One CA step (train.py L1080-1150) on the anchor images' latents."""

    def __init__(self, engine, methods):
        import torch
        from diffusers import DDPMScheduler

        from ..modeling import encode_prompts
        from ..training import TrainingError

        ((self.name, self.method),) = methods.items()
        self.engine = engine
        self.last_step = {}
        found = engine.references.get("anchor")
        if found is None:
            raise TrainingError(f"{self.method.target}: CA's anchor images were not given to "
                                "the job")  # fmt: skip
        self.method.anchor = anchor = found.extra["anchor"]
        self.latents = found.latents.to(engine.device, engine.dtype)
        self.anchor_prompts = found.prompts
        self.target_prompts = [p.replace(anchor, self.method.target) for p in found.prompts]
        unique = list(dict.fromkeys(self.anchor_prompts + self.target_prompts))
        self.row = {p: k for k, p in enumerate(unique)}
        self.embeddings = encode_prompts(engine.pipe, unique)
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        n = len(self.latents)
        shuffle = torch.Generator().manual_seed(derive_seed("ca-instances", engine.seed))
        self.instances = torch.randperm(n, generator=shuffle)
        self.epochs: dict[int, torch.Tensor] = {}
        self.mask = interior_mask(*self.latents.shape[-2:]).to(engine.device)

    def order(self, epoch: int):
        """The data loader's order of the dataset in `epoch` (a fresh shuffle each epoch)."""
        import torch

        if epoch not in self.epochs:
            seed = derive_seed("ca-epoch", self.engine.seed, epoch)
            generator = torch.Generator().manual_seed(seed)
            self.epochs[epoch] = torch.randperm(len(self.latents), generator=generator)
        return self.epochs[epoch]

    def items(self, iteration: int, batch_size: int) -> list[int]:
        n = len(self.latents)
        positions = range(iteration * batch_size, (iteration + 1) * batch_size)
        return [int(self.order(p // n)[p % n]) for p in positions]

    def context(self, prompts: list[str]):
        return self.embeddings[[self.row[p] for p in prompts]]

    def losses(self, iteration: int):
        import torch
        import torch.nn.functional as F

        engine, method, s = self.engine, self.method, self.method.settings
        items = self.items(iteration, s.batch_size)
        instances = [int(self.instances[j]) for j in items]
        chosen, prompts = instances, [self.target_prompts[i] for i in instances]
        if method.prior:  # the batch is [instance; prior] (utils.py collate_fn)
            chosen = instances + items
            prompts = prompts + [self.anchor_prompts[j] for j in items]
        generator = engine.generator(iteration)
        latents = self.latents[chosen]
        if s.hflip:
            flips = torch.rand(len(chosen), generator=generator) < 0.5
            latents = torch.where(flips.view(-1, 1, 1, 1).to(latents.device),
                                  latents.flip(-1), latents)  # fmt: skip
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(chosen),), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        timesteps = timesteps.to(engine.device)
        prediction = engine.predict(noisy, timesteps, self.context(prompts), [len(chosen)])
        b = len(instances)
        if s.loss == "model-based":  # the prior half's target stays the noise (L1112-1113)
            with torch.no_grad():
                anchor_context = self.context([self.anchor_prompts[i] for i in instances])
                anchor = engine.predict(noisy[:b], timesteps[:b], anchor_context, [b])
            target = torch.cat([anchor, noise[b:]])
        elif self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        error = F.mse_loss(prediction[:b].float(), target[:b].float(), reduction="none")
        # Summed over the 4 channels, divided by the 1-channel mask's area (train.py L1135).
        loss = ((error * self.mask).sum([1, 2, 3]) / self.mask.sum([1, 2, 3])).mean()
        if method.prior:
            prior = F.mse_loss(prediction[b:].float(), target[b:].float(), reduction="mean")
            loss = loss + s.prior_loss_weight * prior
        self.last_step = {"items": items}
        return {self.name: loss}
