"""The study's settings as typed objects, and the constants every stage shares.

`workflow/rules/common.smk` resolves the config once into these objects and hands each rule
exactly its own: the settings that change a result as `params` (plain builtins, so Snakemake's
params trigger sees them: a change reruns exactly the jobs it affects), the knobs that change
no result beyond float noise (devices, batch sizes, concurrency, timeouts) as an untracked
runtime namespace. The library takes these objects, never the whole config. This module
imports no torch or openai, so the Snakefile parses fast.
"""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace
from typing import ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# -- constants of the study -----------------------------------------------------------------
Category = Literal["object", "ip", "celebrity"]
CATEGORIES = get_args(Category)  # Table 1's column groups, in its order
LIST_LENGTH = 15  # corefs and retains per concept (paper: 15 + 15)
N_TRAIN, N_TEST = 10, 5  # the paper's split of each list
# The judge's readable answers; anything else is recorded as invalid and counted apart.
ANSWERS = ("yes", "no")
# The groups of a concept's prompts, in Table 1's column order.
GROUPS = ("target", "coref_train", "coref_test", "retain_train", "retain_test")
# Table 1's metric of each group: the share of images the judge says show the prompt's concept.
METRICS = {
    "target": "Acc_U",
    "coref_train": "Acc_C_train",
    "coref_test": "Acc_C_test",
    "retain_train": "Acc_R_train",
    "retain_test": "Acc_R_test",
}
LIST_PROMPT_VERSION = "appendix-a-v1"  # the LLM prompt for the lists (crce.llm)
# Bumped whenever the trainer computes something else for the same settings. It enters the
# erase rule's params and every checkpoint, so results of an older trainer are never reused.
#   1: initial; 2: the UNet timestep is the official 1000-step schedule index (FACTS 2.4),
#   i ~ U{1..ddim_steps-2}, randomness per (seed, concept, iteration), official sphere/RealEra.
TRAINER_VERSION = 2


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, concept, iteration, ...): stable across processes
    and machines, unlike hash()."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def method_label(name: str, spec: dict) -> str:
    """A method's row label in Table 1 (its config `label`, else its name)."""
    return spec.get("label", name)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_params(self) -> dict:
        """Plain builtins for a rule's `params` (the rerun trigger compares their repr)."""
        return self.model_dump(mode="json")


def jobs_import_from(src: str) -> None:
    """Make every job import this package from the checkout at `src` (PYTHONPATH, inherited by
    the scripts Snakemake starts, on the cluster too): envs carry third-party packages only, so
    an edit to src/crce reaches every job without rebuilding an env, and without changing an
    env's identity (which would rerun every job)."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if src not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, *paths) if p)


def untracked(settings: _Settings) -> SimpleNamespace:
    """Knobs that change no result, for a rule's params: Snakemake's params trigger records
    builtins only (snakemake.persistence), so a SimpleNamespace never causes a rerun. The job
    rebuilds the settings object with `Model(**vars(namespace))`."""
    return SimpleNamespace(**settings.model_dump(mode="json"))


# -- training --------------------------------------------------------------------------------
ParamSet = Literal["xattn-kv", "xattn-qk", "xattn", "noxattn"]


class SphereSettings(_Settings):
    """Neighbours e + r (v - e)/|v - e| of the stacked [uncond; cond] target embedding e,
    v ~ N(0, I), r ~ U[0, R], kept by cosine band (FACTS 2.7)."""

    radius: float = 400.0
    # absolute: R = radius (the official code's 400, fitted to CLIP-L's norm);
    # relative: R = radius * |e| (one setting for any text space, e.g. the tiny and toy ones).
    radius_mode: Literal["absolute", "relative"] = "absolute"
    coref_cos_min: float = 0.5
    coref_cos_max: float = 0.9
    retain_cos_max: float = 0.5


class TrainSettings(_Settings):
    """One iterative erasure method (ESD-x, CRCE, CRCE-Fixed, CRCE-Sphere, RealEra)."""

    strategy: Literal["esd", "crce", "sphere", "realera"] = "esd"
    n_corefs: int = Field(5, ge=0)
    n_retains: int = Field(3, ge=0)
    fixed: bool = False
    params: ParamSet = "xattn-kv"
    lr: float = 1e-5
    iterations: int = 500
    eta: float = 1.0
    coref_anchor: Literal["target", "self"] = "target"
    xt_model: Literal["trained", "frozen"] = "trained"
    start_guidance: float = 3.0
    ddim_steps: int = Field(50, ge=3)  # i ~ U{1..ddim_steps-2} needs at least 3
    alpha: float = 1.0
    beta: float = 1.0
    sphere: SphereSettings = SphereSettings()
    precision: Literal["float32", "bfloat16"] = "bfloat16"

    # Keys a strategy never reads: left out of its params, so changing them reruns nothing.
    _UNUSED: ClassVar[dict[str, set[str]]] = {
        "esd": {"n_corefs", "n_retains", "fixed", "coref_anchor", "alpha", "beta", "sphere"},
        "crce": {"sphere"},
        "sphere": {"fixed"},
        "realera": {"fixed"},
    }

    def as_params(self) -> dict:
        return self.model_dump(mode="json", exclude=self._UNUSED[self.strategy])


def is_iterative(settings) -> bool:
    return isinstance(settings, TrainSettings)


# Settings every method of a training group must share: one x_t rollout serves them all.
GROUP_KEYS = ("params", "ddim_steps", "iterations", "start_guidance", "xt_model", "precision")


def group_key(settings: TrainSettings) -> tuple:
    return tuple(getattr(settings, key) for key in GROUP_KEYS)


def training_groups(trained: dict, enabled: bool) -> list[str]:
    """Methods that train as one batched job per concept: the largest set of methods sharing
    GROUP_KEYS (two or more; the parameter set made of Linear layers), the rest on their own;
    [] when no two methods can share a job."""
    if not enabled:
        return []
    by_key: dict[tuple, list[str]] = {}
    for name, settings in trained.items():
        if is_iterative(settings) and settings.params != "noxattn":  # Linear layers only
            by_key.setdefault(group_key(settings), []).append(name)
    largest = max(by_key.values(), key=len, default=[])
    return largest if len(largest) > 1 else []


class TrainRuntime(_Settings):
    # Train a concept's methods in one batched job (equal to separate runs to float noise).
    group_methods: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    device: str = "auto"


class UceSettings(_Settings):
    """Unified Concept Editing (Gandikota et al., WACV 2024), closed form, as its official
    `trainscripts/uce_sd_erase.py` (rohitgandikota/unified-concept-editing at ea9644fd)
    computes it: every attn2 to_k / to_v weight W becomes the ridge least-squares solution
    W = (lamb W0 + sum_e es_e v*_e c_e^T + sum_p ps_p W0 c_p c_p^T)
        (lamb I + sum_e es_e c_e c_e^T + sum_p ps_p c_p c_p^T)^-1,
    c = a concept's last-word token embedding, v*_e = W0 c_guide. `lists: false` erases the
    target alone and preserves nothing (UCE's own default); `lists: true` (uce-cr) erases the
    target and its train corefs and preserves its train retains, each scaled by its
    certainty weight."""

    strategy: Literal["uce"] = "uce"
    lists: bool = False
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5
    guide: str = ""  # the anchor concept (UCE: "" for objects, i.e. the start token)
    certainty_weights: bool = True  # lists only: scale each item by its certainty weight


ExternalFormat = Literal["auto", "unet", "pipeline", "safetensors", "crce-pt"]


class ExternalSettings(_Settings):
    """Weights made elsewhere (e.g. MACE's official outputs): nothing trains; the job turns
    the checkpoint at `path` (with {concept}) into this pipeline's delta."""

    strategy: Literal["external"] = "external"
    path: str
    format: ExternalFormat = "auto"


MethodSettings = TrainSettings | UceSettings | ExternalSettings
# The strategies that do not train iteratively, by their settings class.
NON_ITERATIVE = {"uce": UceSettings, "external": ExternalSettings}


def parse_method(params: dict) -> MethodSettings:
    """A method's settings from its params (the strategy says which kind)."""
    return NON_ITERATIVE.get(params["strategy"], TrainSettings)(**params)


class SettingsError(ValueError):
    """A setting that cannot be resolved; the message names the method and key."""


def resolve_method(name: str, spec: dict, train: dict, uce: dict | None = None) -> MethodSettings:
    """A method's settings: for an iterative strategy the `train` settings (runtime keys
    already apart) overridden by the method's own keys; for UCE the `uce` defaults overridden
    by its keys; for an external checkpoint its keys alone (label aside)."""
    own = {k: v for k, v in spec.items() if k != "label"}
    if own.get("strategy") in NON_ITERATIVE:
        base = dict(uce or {}) if own["strategy"] == "uce" else {}
        try:
            return NON_ITERATIVE[own["strategy"]](**{**base, **own})
        except ValueError as err:
            raise SettingsError(f"method {name!r}: {err}") from None
    merged = dict(train)
    for key, value in own.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if nested else value  # sphere: key by key
    unknown = sorted(set(merged) - set(TrainSettings.model_fields))
    if unknown:
        raise SettingsError(f"method {name!r}: unknown training key(s): {', '.join(unknown)}")
    try:
        return TrainSettings(**merged)
    except ValueError as err:
        raise SettingsError(f"method {name!r}: {err}") from None


# -- lists and splits ------------------------------------------------------------------------
class ListSettings(_Settings):
    """Where a concept's lists come from and how the LLM is asked (coref_lists)."""

    curated_dir: str | None = None
    # The official CorefConcept dataset: a URL (its folder at a pinned commit) or a local
    # folder, with the sha256 of each category's file; None asks the LLM for every concept.
    dataset: str | None = None
    dataset_sha256: dict[str, str] = {}
    model: str = "gpt-4o"
    temperature: float = 0.0
    seed: int | None = 0
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    prompt_version: str = LIST_PROMPT_VERSION


class LlmRuntime(_Settings):
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    serve: str | None = None
    startup_timeout: float = 600.0
    timeout: float = 120.0
    max_attempts: int = 3  # re-asks after an answer that breaks a rule
    max_retries: int = 4  # transport retries (429, 5xx, timeouts, refused connections)
    retry_wait_max: float = 20.0


class SplitSettings(_Settings):
    seed: int
    n_train: int = N_TRAIN
    n_test: int = N_TEST


# -- evaluation ------------------------------------------------------------------------------
class SampleSettings(_Settings):
    images_per_prompt: int = 80
    steps: int = 50
    guidance: float = 7.5
    resolution: int = 512
    precision: Literal["float32", "float16", "bfloat16"] = "float16"
    # The sampler, built with from_config of the model's own scheduler config: ddim (official
    # code), pndm (what SD v1.4 ships), euler, dpmsolver, or model (keep the model's own).
    scheduler: Literal["ddim", "pndm", "euler", "dpmsolver", "model"] = "ddim"


class SampleRuntime(_Settings):
    batch_size: int = 32
    device: str = "auto"


class JudgeSettings(_Settings):
    model: str
    prompt: str
    prompt_version: str
    # <X> for retain images: the retain's own text (is it still drawn?) or the target.
    retain_question: Literal["retain", "target"] = "retain"
    # choice: vLLM's constrained yes/no; none: a plain chat request (any OpenAI-compatible
    # API), its answer read by its first word, re-asked once, else recorded as invalid.
    structured_output: Literal["choice", "none"] = "choice"


class JudgeRuntime(_Settings):
    serve: str | None = None
    base_url: str | None = None
    api_key_env: str = "VLLM_API_KEY"
    startup_timeout: float = 1800.0
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 4


# -- beyond Table 1 (quality, robustness, the judge audit) --------------------------------
class FeatureSettings(_Settings):
    """The image (and text) embedding of the quality and audit targets: a CLIP model, or the
    toy world's shape classifier (its penultimate layer; no text tower, so no CLIP score)."""

    kind: Literal["clip", "toy"] = "clip"
    pretrained: str = "openai/clip-vit-large-patch14"


class FeatureRuntime(_Settings):
    device: str = "auto"
    batch_size: int = 64


class QualitySettings(_Settings):
    """General quality on neutral prompts and collateral damage on retain images."""

    # CSV with a `prompt` column: a URL (fetched on the login node, local rule) or a local file.
    prompts: str
    prompts_sha256: str | None = None
    per_concept: int = 100  # neutral prompts each concept's model draws (fixed-seed subset)
    seed: int = 0
    real_images: str | None = None  # a folder of real images to compare with, optional
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def neutral_params(self) -> dict:
        """What the neutral sampler reads: its params leave out the KID and reference
        settings, so changing those reruns the `quality` table, no sampling job."""
        return self.model_dump(mode="json", include={"per_concept", "seed"})


class RobustnessSettings(_Settings):
    """Prompts that depict the target without naming it: from the LLM (K per concept, none
    containing the target's name or a coref's text) and/or templates over the target and its
    test corefs; judged exactly as Table 1's target images."""

    llm_prompts: int = 10  # K; 0 asks the LLM nothing
    templates: list[str] = ["a photo of {}", "a painting of {}", "a drawing of {}"]
    prompt_version: str = "robust-v1"
    curated_dir: str | None = None  # resources/robustness/{concept}.json, wins over the LLM
    images_per_prompt: int = 10


class AuditSettings(_Settings):
    """How far to trust the judge: a second judge on the same images, and a sheet for humans."""

    # clip: a zero-shot CLIP classifier; renders: the judge's accuracy on labelled renders
    # (the toy world, where no trained CLIP exists).
    second_judge: Literal["clip", "renders"] = "clip"
    template: str = "a photo of {}"
    per_concept: int = 8  # images per concept on the human audit sheet
    seed: int = 0
    renders: int = 200  # labelled renders per concept (second_judge: renders)

    def second_judge_params(self) -> dict:
        """What the second judge reads (the sheet's size is `judge_audit`'s alone)."""
        return self.model_dump(mode="json", exclude={"per_concept"})


def split_known(model: type[_Settings], section: dict) -> tuple[dict, dict]:
    """A config section's keys of `model`, and the rest."""
    known = {k: v for k, v in section.items() if k in model.model_fields}
    return known, {k: v for k, v in section.items() if k not in known}


class Sweep:
    """Paper Table 6: one method's settings at every (M, N) of a grid, on the concepts of some
    categories. A cell whose settings equal the method's own is that method (its Table 1 job,
    not a second training); the others are the sweep's own methods, never in Table 1."""

    def __init__(self, sweep: dict | None, trained: dict, n_train: int):
        self.cells: dict[tuple[int, int], str] = {}
        self.trained: dict[str, TrainSettings] = {}
        self.categories: list[str] = list((sweep or {}).get("categories", []))
        if not sweep:
            return
        name = sweep["method"]
        base = trained.get(name)
        if not isinstance(base, TrainSettings) or base.strategy != "crce":
            raise SettingsError(f"sweep.method {name!r} must be a method with strategy crce")
        for m in sweep["n_corefs"]:
            for n in sweep["n_retains"]:
                if max(m, n) > n_train:
                    raise SettingsError(
                        f"sweep: M={m}, N={n} draw more items than the train split has "
                        f"(split.n_train={n_train})"
                    )
                cell = base.model_copy(update={"n_corefs": m, "n_retains": n})
                cell_name = name if cell == base else f"{name}-m{m}-n{n}"
                self.cells[(m, n)] = cell_name
                if cell_name != name:
                    self.trained[cell_name] = cell


class Study:
    """The config resolved once into each stage's settings (common.smk)."""

    def __init__(self, config: dict):
        self.seed = config["seed"]
        self.model = config["model"]["pretrained"]
        self.model_build = config["model"].get("build")  # tiny: the workflow builds the model
        self.methods = config["methods"]
        self.labels = {m: method_label(m, spec) for m, spec in self.methods.items()}
        runtime, train = split_known(TrainRuntime, config["train"])
        self.train_runtime = TrainRuntime(**runtime)
        self.trained = {
            name: resolve_method(name, spec, train, config.get("uce"))
            for name, spec in self.methods.items()
            if spec["strategy"] != "none"
        }
        self.split = SplitSettings(seed=self.seed, **config["split"])
        self.sweep = Sweep(config.get("sweep"), self.trained, self.split.n_train)
        # train.group_methods: one erase job per concept trains Table 1's group, another the
        # sweep's cells (crce.erase); the rest train one method per job.
        self.grouped = training_groups(self.trained, self.train_runtime.group_methods)
        self.sweep_grouped = training_groups(self.sweep.trained, self.train_runtime.group_methods)
        self.all_trained = {**self.trained, **self.sweep.trained}
        grouped = set(self.grouped) | set(self.sweep_grouped)
        self.solo = [m for m in self.all_trained if m not in grouped]
        llm, corefs = config["llm"], config["corefs"]
        self.lists = ListSettings(**corefs, **split_known(ListSettings, llm)[0])
        self.llm_runtime = LlmRuntime(**split_known(LlmRuntime, llm)[0])
        self.sample = SampleSettings(**split_known(SampleSettings, config["sample"])[0])
        self.sample_runtime = SampleRuntime(**split_known(SampleRuntime, config["sample"])[0])
        self.judge = JudgeSettings(**split_known(JudgeSettings, config["judge"])[0])
        self.judge_runtime = JudgeRuntime(**split_known(JudgeRuntime, config["judge"])[0])
        features = config.get("features", {})
        self.features = FeatureSettings(**split_known(FeatureSettings, features)[0])
        self.features_runtime = FeatureRuntime(**split_known(FeatureRuntime, features)[0])
        self.features_build = features.get("build")  # tiny-clip: the test world builds one
        self.quality = QualitySettings(**config["quality"]) if "quality" in config else None
        self.robustness = RobustnessSettings(**config.get("robustness", {}))
        self.audit = AuditSettings(**config.get("audit", {}))
