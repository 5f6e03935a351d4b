"""What a method is to this pipeline: a class with its settings, its kind, and what it computes.

A method family is one class (a subclass of `Method`) in one module, named in the config by
its `strategy` (a built-in name from `crce.methods.BUILTIN`, or `module:Class` for a method
in your own file). It declares, in one place:

- `Settings`: a pydantic model of its keys, each with a `description` (the config schema and
  config/README.md are generated from them);
- `section` and `own_keys`: the config section whose keys are its defaults (`train` for the
  methods the engine trains, `uce` for UCE) and the keys only its own entry may set; the keys
  it reads from the section are its fields minus those;
- `kind` (`Kind`): none (the base model), iterative (trained by the engine: a GPU job, grouped
  with others, checkpointed), closed form (solved once: a short CPU-sized job) or external
  (read from elsewhere): the kind decides the job's resources;
- what it computes: `plan()` or an `Objective` for an iterative method (crce.training), or
  `solve()` for a closed-form one; `erase()` for a method in stages;
- optional hooks: `references()` (image sets it trains on), `sampling()` (what it changes at
  sampling time: the pipeline, its call, or each batch per prompt), `families` (the
  base-model families it supports).

This module imports no torch (the Snakefile reads the registry at parse time); methods import
it inside what they compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Kind(StrEnum):
    NONE = "none"  # the base model: no erase job
    ITERATIVE = "iterative"  # the engine trains it (crce.training)
    CLOSED_FORM = "closed_form"  # one solve
    EXTERNAL = "external"  # weights made elsewhere
    INFERENCE = "inference"  # changes sampling only (SLD): no erase job


# What each kind's erase job asks of a cluster (the rules' resources): a GPU and an hour per
# attempt for training; a solve or a read needs neither.
KIND_RESOURCES = {
    Kind.ITERATIVE: {"gpu": 1, "minutes": 60},
    Kind.CLOSED_FORM: {"gpu": 0, "minutes": 15},
    Kind.EXTERNAL: {"gpu": 0, "minutes": 15},
}


class MethodSettings(BaseModel):
    """A method's settings; `strategy` names its class (a built-in name or `module:Class`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(description="which method family (the registry's name)")

    def as_params(self) -> dict:
        """Plain builtins for a rule's `params` (the rerun trigger compares their repr)."""
        return self.model_dump(mode="json")


ParamSet = Literal["xattn-kv", "xattn-qk", "xattn", "noxattn", "noxattn-compvis", "full"]


class IterativeSettings(MethodSettings):
    """What every method the engine trains reads (from `train`, or its own entry)."""

    params: ParamSet = Field(
        "xattn-kv",
        description="trained UNet tensors: `xattn-kv` (paper: attn2 to_k/to_v), `xattn-qk` "
        "(official CRCE code), `xattn` (every attn2 Linear, the ESD code's ESD-x), `noxattn` "
        "(ESD-u as the ESD code's diffusers esd_sd.py selects it: every Linear and Conv2d "
        "outside attn2, norms not), `noxattn-compvis` (the original ESD code's ESD-u: every "
        "parameter outside attn2 but time_embedding and conv_out, norms included), `full` (every "
        "UNet parameter)",
    )
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (paper 1e-5; CRCE code 2e-5)")
    iterations: int = Field(500, ge=1, description="optimiser steps per concept")
    precision: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="`bfloat16` (autocast, fp32 masters; GPU only) or `float32`"
    )


@dataclass(frozen=True)
class ReferenceRequest:
    """A set of images a method trains on, drawn from the base model once for every method
    that asks for an equal set (the `reference_images` rule)."""

    name: str  # how the method refers to it (the engine's `references[name]`)
    prompts: tuple[str, ...]
    images_per_prompt: int
    steps: int = 50
    guidance: float = 7.5
    resolution: int | None = None  # None: the study's `sample.resolution`
    scheduler: str = "model"  # the model's own (SD v1.4: PNDM, what a plain pipeline call uses)
    seed: int = 0
    extra: dict = field(default_factory=dict)  # anything else that decides the set
    # Prompts from the concept's split instead (`prompts` empty): `template` on the items of
    # this group ("retain_train"), read by the job once the split exists.
    from_split: str | None = None
    template: str = "{}"
    # The LLM's anchor of the concept (results/anchors/{concept}.json, read by the job): the
    # `extra` key it fills, and how many of its captions are the prompts (0: not the prompts).
    from_anchor: str | None = None
    anchor_captions: int = 0
    # Masks of the concept in each image (crce.masks): {"segmenter", "label", "threshold"}.
    masks: dict | None = None


class Sampling:
    """What a method changes at sampling time beyond its delta, for every target that samples
    (Table 1, quality, robustness): each part defaults to no change."""

    def pipeline(self, pipe):
        """The pipeline to sample with, built on `pipe`'s modules (SLD's safe pipeline)."""
        return pipe

    def export_pipeline(self, pipe):
        """The pipeline an export saves (by default the one it samples with)."""
        return self.pipeline(pipe)

    def call_kwargs(self) -> dict:
        """Extra arguments of every pipeline call (SLD's preset)."""
        return {}

    def export_caveat(self) -> str | None:
        """What an export of the model lacks of how the pipeline samples it (SPM: its
        per-prompt transport), written beside the exported pipeline; None: nothing."""
        return None

    @contextlib.contextmanager
    def batch(self, pipe, prompts: list[str]):
        """Around each batch, with its prompts in order (SPM scales its adapter per prompt)."""
        yield


class Method:
    """One method family: the registry maps its `strategy` name to this class."""

    name: ClassVar[str]  # the registry name (a built-in) or None for a class found by path
    kind: ClassVar[Kind]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    section: ClassVar[str | None] = None  # config section of its defaults
    own_keys: ClassVar[frozenset[str]] = frozenset()  # keys only its own entry may set
    families: ClassVar[frozenset[str]] = frozenset({"sd1"})  # base-model families it runs on

    def __init__(self, settings: MethodSettings, *, target: str, split, seed: int):
        self.settings = settings
        self.target = target
        self.split = split
        self.seed = seed

    # -- what the workflow asks before any job runs --------------------------------------
    @classmethod
    def section_keys(cls) -> list[str]:
        """The keys it reads from its config section (its fields minus its own keys)."""
        if cls.section is None:
            return []
        return [k for k in cls.Settings.model_fields if k != "strategy" and k not in cls.own_keys]

    @classmethod
    def bounded(cls, settings: MethodSettings, max_iterations: int) -> MethodSettings:
        """Its settings with at most `max_iterations` iterations (`train.max_iterations`); a
        method with a schedule counted in iterations (SPM's warm-up) scales it alike."""
        if getattr(settings, "iterations", 0) <= max_iterations:
            return settings
        return settings.model_copy(update={"iterations": max_iterations})

    @classmethod
    def group_key(cls, settings: MethodSettings) -> tuple | None:
        """Methods with equal keys train in one batched job (train.group_methods); None: alone."""
        return None

    @classmethod
    def config_problems(cls, settings: MethodSettings, *, n_train: int) -> list[str]:
        """What the config alone says cannot work (found before any job runs): e.g. more items
        drawn per iteration than a train split has (`n_train`)."""
        return []

    @classmethod
    def references(cls, settings: MethodSettings, concept: dict) -> list[ReferenceRequest]:
        """Image sets it trains on (none by default)."""
        return []

    @classmethod
    def sampling(cls, settings: MethodSettings, delta: str | None, concept: dict,
                 split=None) -> Sampling | None:  # fmt: skip
        """What the sampler changes for this method, given its delta (if it has one), the
        concept (id, text, category) and, when `sampling_reads_split`, its split; None: it
        samples like the base model with its delta."""
        return None

    @classmethod
    def sampling_reads_split(cls, settings: MethodSettings) -> bool:
        return False

    def delta_metadata(self) -> dict:
        """What its sampling hook needs from the erase job, stored in the delta's metadata
        (crce.deltas.delta_record reads it back); nothing by default."""
        return {}

    @classmethod
    def job_inputs(cls, settings: MethodSettings, concept_id: str) -> list[str]:
        """Files its erase job reads beyond the split (an external checkpoint)."""
        return []

    # -- the erase job ----------------------------------------------------------------------
    @classmethod
    def erase(cls, job, methods: dict[str, Method]) -> dict[str, tuple[dict, dict]]:
        """Each method's (trained tensors, record) for the job (crce.erase.Job). A method in
        stages overrides this; the default is one step of its kind."""
        raise NotImplementedError


class IterativeMethod(Method):
    """A method the engine trains (crce.training.Engine): the engine owns the model calls'
    batching, the optimiser, the randomness per (seed, concept, iteration) and the
    checkpoints; the method says what to train and what to minimise.

    The contract, each with a default:
    - `trainable(unet)`: the UNet tensor names it trains (default: `settings.params`); any
      named set works, the whole UNet included;
    - `texts()`: the prompts its objective conditions on (encoded once, with the target);
    - `objective(engine, methods)`: the `Objective` computing one iteration's loss of each
      method of a group; the ESD family shares crce.training.plan.PlanObjective, which
      batches every method's `plan(iteration, generator)`;
    - `extra_parameters(engine)`: tensors it adds and trains beyond the UNet's (new token
      embeddings), checkpointed with the rest, not in the delta;
    - `optimizer` / `optimizer_kwargs()`: the optimiser class and its arguments (Adam at lr);
      `lr_factor(iteration)`: a learning-rate schedule (constant by default);
      `max_grad_norm()`: clip its gradients' norm before each step (None: no clipping);
    - `delta(tensors)`: what of the trained tensors the delta keeps (all by default).
    """

    kind = Kind.ITERATIVE
    Settings: ClassVar[type[IterativeSettings]] = IterativeSettings
    section = "train"
    optimizer: ClassVar[str] = "Adam"

    def trainable(self, unet) -> list[str]:
        from ..modeling import select_parameters

        return select_parameters(unet, self.settings.params)

    def texts(self) -> list[str]:
        return []

    def prepare(self, engine) -> None:
        """Called once the engine has encoded every method's texts (`engine.prompts`)."""
        self.engine = engine

    def extra_parameters(self, engine) -> dict:
        return {}

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"lr": self.settings.lr}

    def lr_factor(self, iteration: int) -> float:
        """The learning rate at `iteration` as a share of `lr` (a schedule; constant here)."""
        return 1.0

    def max_grad_norm(self) -> float | None:
        return None

    def delta(self, tensors: dict) -> dict:
        return tensors

    @classmethod
    def objective(cls, engine, methods: dict[str, IterativeMethod]):
        raise NotImplementedError(f"{cls.__name__} defines no objective")

    @classmethod
    def erase(cls, job, methods):
        from ..training.engine import Engine

        engine = Engine(job.pipe, methods, seed=job.seed, runtime=job.runtime,
                        references=job.references)  # fmt: skip
        summaries = engine.train(job.checkpoint_dir)
        deltas = engine.deltas()
        return {m: (deltas[m], summaries[m]) for m in methods}


class ClosedFormMethod(Method):
    """A method solved once from the base model (`solve`): no training loop, no checkpoint."""

    kind = Kind.CLOSED_FORM

    def solve(self, pipe) -> dict:
        raise NotImplementedError

    @classmethod
    def erase(cls, job, methods):
        ((name, method),) = methods.items()
        return {name: (method.solve(job.pipe), {})}
