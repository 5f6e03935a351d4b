"""Each stage's settings as typed objects (the methods' own are in `crce.methods`).

`crce.study` resolves the config once into these objects and `workflow/rules/common.smk` hands
each rule exactly its own: the settings that change a result as `params` (plain builtins, so
Snakemake's params trigger sees them: a change reruns exactly the jobs it affects), the knobs
that change no result beyond float noise (devices, batch sizes, concurrency, timeouts) as an
untracked runtime namespace. The library takes these objects, never the whole config.

Every field carries its `description`: `python -m crce.config_schema` generates the config's
JSON schema and config/README.md's key tables from them. This module imports no torch or
openai, so the Snakefile parses fast.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .constants import LIST_PROMPT_VERSION, N_TEST, N_TRAIN, Category

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# A field that is a setting of the code, not of the config (e.g. a prompt's version): it
# reaches the params, but no config key sets it.
INTERNAL = {"config": False}


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_params(self) -> dict:
        """Plain builtins for a rule's `params` (the rerun trigger compares their repr)."""
        return self.model_dump(mode="json")


# -- the base model ---------------------------------------------------------------------------
class ModelSettings(_Settings):
    pretrained: str = Field(
        description="base model: a hub id (`CompVis/stable-diffusion-v1-4`) or a local "
        "diffusers folder, loaded with `from_pretrained`"
    )
    build: str | None = Field(
        None,
        description="`null`, or a builder `module:function` (a small world's, e.g. "
        "`crce_worlds.tiny:build_tiny_pipeline`) that the `base_model` rule runs to write "
        "the model into `pretrained` (tests)",
    )


# -- lists and splits ---------------------------------------------------------------------------
class CorefSource(_Settings):
    """Where a concept's lists come from (config section `corefs`)."""

    curated_dir: str | None = Field(
        None, description="hand-refined lists `{id}.json`; they win over every other source"
    )
    dataset: str | None = Field(
        None,
        description="the official CorefConcept dataset: a URL of its folder (default: the "
        "repository's raw files at commit f92eced, fetched by `download`) or a local folder "
        "with `{category}.json`; `null` asks the LLM for every concept. A local folder must "
        "hold the file of every category in the sheet",
    )
    dataset_sha256: dict[Category, Sha256] = Field(
        {},
        description="sha256 of each category's file; a fetched file that differs is an "
        "error naming it",
    )


class LlmQuery(_Settings):
    """How the LLM is asked (config section `llm`, the keys that change its answer)."""

    model: str = Field("gpt-4o", description="chat model writing the lists (served name)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of each request")
    seed: int | None = Field(0, description="seed sent with each request")
    structured_output: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema", description="`json_schema` (strict), `json_object` or `none`"
    )
    prompt_version: str = Field(
        LIST_PROMPT_VERSION, description="the list prompt's version", json_schema_extra=INTERNAL
    )


class ListSettings(LlmQuery, CorefSource):
    """Where a concept's lists come from and how the LLM is asked (coref_lists)."""


class LlmRuntime(_Settings):
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (OpenAI's own when `null` and no `serve`)"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="name of the environment variable with the key (never logged or written)",
    )
    serve: str | None = Field(
        None,
        description="command template that starts a server for the job (`{port}`, "
        "`{model}`, `{python}`), or `null`",
    )
    startup_timeout: float = Field(600.0, gt=0, description="seconds to wait for a started server")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_attempts: int = Field(
        3,
        ge=1,
        description="re-asks after an answer that breaks a rule (count, duplicates, "
        "target, overlap)",
    )
    max_retries: int = Field(
        4, ge=1, description="tries per request on 429, 5xx, timeouts and refused connections"
    )
    retry_wait_max: float = Field(20.0, ge=0, description="longest backoff wait, in seconds")


class SplitSettings(_Settings):
    seed: int = Field(description="the study's seed", json_schema_extra=INTERNAL)
    n_train: int = Field(N_TRAIN, ge=1, description="items per list in the train split (10)")
    n_test: int = Field(N_TEST, ge=0, description="items per list in the test split (5)")


# -- training (the runtime part; each method's settings are in crce.methods) ------------------
class TrainRuntime(_Settings):
    group_methods: bool = Field(
        False,
        description="train a concept's methods that share a parameter set, DDIM steps, "
        "iterations, guidance, x_t source and precision in one batched job (on in the paper "
        "study; off in the test world, where one changed method then reruns alone). Equal to "
        "separate runs to float noise; adding a method retrains that concept's group. Not a "
        "param: switching it reruns nothing",
    )
    compile: bool = Field(False, description="`torch.compile` the UNet")
    gradient_checkpointing: bool = Field(False, description="trade time for memory")
    checkpoint_every: int = Field(
        50,
        ge=1,
        description="resumable checkpoint interval (iterations), under "
        "`results/.checkpoints` (not an output)",
    )
    device: str = Field("auto", description="`auto` (cuda when present), `cuda` or `cpu`")
    max_iterations: int | None = Field(
        None,
        ge=1,
        description="an upper bound on every trained method's iterations, its own defaults "
        "included (SPM's official 3,000, its warm-up scaled alike): how the small worlds scale "
        "every method. Not a param itself: a method whose iterations it changes reruns "
        "through its own",
    )


# -- evaluation -------------------------------------------------------------------------------
class SampleSettings(_Settings):
    images_per_prompt: int = Field(
        80, ge=1, description="images per prompt (80 in the official code), 31 prompts per concept"
    )
    steps: int = Field(50, ge=1, description="sampling steps")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale")
    resolution: int = Field(512, ge=8, description="image side in pixels")
    precision: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="`float16`, `bfloat16` or `float32` on GPU (CPU always uses float32)"
    )
    scheduler: Literal["ddim", "pndm", "euler", "dpmsolver", "model"] = Field(
        "ddim",
        description="`ddim` (official code), `pndm` (what SD v1.4 ships: a pipeline loaded as "
        "is samples with it), `euler`, `dpmsolver`, or `model` (keep the model's own); built "
        "with `from_config` of the model's scheduler config and named in `sampling.json` "
        "beside the images",
    )


class SampleRuntime(_Settings):
    batch_size: int = Field(32, ge=1, description="images per pipeline call")
    device: str = Field("auto", description="`auto`, `cuda` or `cpu`")


class JudgeSettings(_Settings):
    model: str = Field(description="the vision-language judge (served name; paper: Qwen2-VL)")
    prompt: str = Field(
        pattern="<X>", description="the question; `<X>` is replaced by the concept asked about"
    )
    prompt_version: str = Field(
        description="bump when the prompt changes: cached answers are keyed by it"
    )
    retain_question: Literal["retain", "target"] = Field(
        "retain",
        description="`retain`: retain images are asked about the retain's own text (is it "
        "still drawn?); `target`: about the target",
    )
    structured_output: Literal["choice", "none"] = Field(
        "choice",
        description="`choice`: vLLM's constrained decoding (`structured_outputs`: the answer "
        "is exactly yes or no); `none`: a plain chat request any OpenAI-compatible API "
        "accepts (OpenAI's own rejects vLLM's field): the answer's first word is read, case "
        "and punctuation aside; an unreadable answer is re-asked once, then recorded as "
        "`invalid`, counted in `results/judge_invalid.csv` and left out of the accuracies",
    )


class JudgeRuntime(_Settings):
    serve: str | None = Field(
        None,
        description="command template that starts the judge server (`{port}`, "
        "`{model}`, `{python}`), or `null` to use `base_url`",
    )
    base_url: str | None = Field(None, description="endpoint of a judge server you already run")
    api_key_env: str = Field(
        "VLLM_API_KEY", description="environment variable holding the judge server's key"
    )
    startup_timeout: float = Field(
        1800.0, gt=0, description="seconds to wait for the judge server (a 7B VLM can take minutes)"
    )
    concurrency: int = Field(64, ge=1, description="requests in flight at once")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_retries: int = Field(4, ge=1, description="tries per request on transient errors")


# -- beyond Table 1 (quality, robustness, the judge audit) --------------------------------
class FeatureSettings(_Settings):
    """The image (and text) embedding of the quality and audit targets."""

    kind: str = Field(
        "clip",
        description="`clip` (a CLIPModel: image and text towers) or an encoder "
        "`module:Class` (e.g. the toy world's `crce_worlds.toy.classifier:ToyFeatures`, its "
        "shape classifier's penultimate layer: no text tower, so no CLIP score)",
    )
    pretrained: str = Field(
        "openai/clip-vit-large-patch14",
        description="its weights: a hub id (fetched by `download`) or a local folder",
    )


class FeatureRuntime(_Settings):
    device: str = Field("auto", description="where the embeddings run (no result depends on it)")
    batch_size: int = Field(64, ge=1, description="images per batch (no result depends on it)")


class FeatureBuild(_Settings):
    """How the test world makes its encoder (the `features_model` rule)."""

    build: str | None = Field(
        None,
        description="a builder `module:function` that writes the encoder into "
        "`pretrained` (the test world's tiny CLIP), or `null`",
    )


class QualitySettings(_Settings):
    """General quality on neutral prompts and collateral damage on retain images."""

    prompts: str = Field(
        description="the neutral captions: a URL (default: the ESD authors' MS-COCO 30k list "
        "at commit 3d10dd1b) or a local CSV with a `prompt` or `caption` column"
    )
    prompts_sha256: Sha256 | None = Field(
        None, description="sha256 of the captions file, checked when set"
    )
    per_concept: int = Field(
        100,
        ge=1,
        description="neutral captions each concept's model draws (and SD with it), "
        "a fixed-seed subset: 100 x 50 concepts = 5,000 per method",
    )
    seed: int = Field(0, description="which captions, and which KID subsets")
    real_images: str | None = Field(
        None, description="a folder of real images for `fd_vs_real` and `kid_vs_real`, or `null`"
    )
    kid_subsets: int = Field(
        100, ge=2, description="KID's subsets (its standard error is over them)"
    )
    kid_subset_size: int = Field(1000, ge=2, description="images per KID subset")

    def neutral_params(self) -> dict:
        """What the neutral sampler reads: its params leave out the KID and reference
        settings, so changing those reruns the `quality` table, no sampling job."""
        return self.model_dump(mode="json", include={"per_concept", "seed"})


class RobustnessSettings(_Settings):
    """Prompts that depict the target without naming it: from the LLM (K per concept, none
    containing the target's name or a coref's text) and/or templates over the target and its
    test corefs; judged exactly as Table 1's target images."""

    llm_prompts: int = Field(
        10,
        ge=0,
        description="K prompts per concept from the LLM that name neither the target "
        "nor a coref (0: none)",
    )
    templates: list[Annotated[str, StringConstraints(pattern=r"[{][}]")]] = Field(
        ["a photo of {}", "a painting of {}", "a drawing of {}"],
        description="templates with `{}`, applied to the target and its test corefs",
    )
    prompt_version: str = Field("robust-v1", description="bump when the LLM prompt changes")
    curated_dir: str | None = Field(
        None,
        description='hand-written prompts `{id}.json` (`{"prompts": [...]}`) that win over the LLM',
    )
    images_per_prompt: int = Field(10, ge=1, description="images per prompt and method")


class RingABellSettings(_Settings):
    """Ring-A-Bell (Tsai et al., ICLR 2024; chiayi-hsu/Ring-A-Bell@e4585ad): a genetic search
    on the base model's text encoder for K-token prompts whose embedding is closest to a base
    prompt's plus `coef` times the concept's vector; one search serves every method."""

    n_base: int = Field(
        5,
        ge=1,
        description="base prompts per concept: the target's own prompt, then its test corefs, "
        "the first n_base (one search each)",
    )
    pairs: int = Field(
        30,
        ge=1,
        description="prompt pairs (with the concept, the same without it) the concept vector "
        "averages, from the LLM (the official CSVs hold 30)",
    )
    curated_dir: str | None = Field(
        None,
        description='hand-written pairs `{id}.json` (`{"pairs": [["with", "without"], ...]}`) '
        "that win over the LLM",
    )
    population: int = Field(200, ge=2, description="population size (`population_size`)")
    generations: int = Field(3000, ge=1, description="generations (`generation`)")
    mutation_rate: float = Field(
        0.25, ge=0, le=1, description="chance an individual gets one random token (`mutateRate`)"
    )
    crossover_rate: float = Field(
        0.5, ge=0, le=1, description="chance a survivor breeds two children (`crossoverRate`)"
    )
    length: int = Field(
        16,
        ge=1,
        le=75,
        description="K, the prompt's tokens (`length`: 16, or 75 for the official K = 77); at "
        "most the tokenizer's length minus 2 (BOS and EOS)",
    )
    coef: float = Field(3.0, description="weight of the concept vector in the target (`cof`)")
    cache: bool = Field(
        True,
        description="re-use a survivor's fitness instead of encoding it again (the official "
        "code encodes the whole population every generation); the same search either way",
    )
    prompt_version: str = Field("pairs-v1", description="bump when the LLM prompt changes")


class UnlearnDiffAtkSettings(_Settings):
    """UnlearnDiffAtk (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack@5a3e5d3,
    `attacker: text_grad`): k prefix tokens optimised against the erased UNet's denoising loss
    on the base model's image of the prompt; white-box, so one attack per (method, concept)."""

    concepts: list[str] = Field(
        [],
        description="the concepts attacked: concept ids or category names (`[]`: none; "
        "opt-in, a GPU-hour per method and concept at paper scale)",
    )
    methods: list[str] | None = Field(
        None, description="the methods attacked (`null`: every method but the base model)"
    )
    n_prompts: int = Field(
        10,
        ge=1,
        description="attacked (prompt, seed) pairs per concept: the first the judge reads as "
        "the target on the base model (the official filter), over the concept's own prompt and "
        "its test corefs at their first `attacks.images_per_prompt` Table 1 seeds",
    )
    k: dict[Category, Annotated[int, Field(ge=1)]] = Field(
        {"object": 3, "celebrity": 3, "ip": 3},
        description="prefix tokens per category (the configs: 3 for objects and styles, 5 for "
        "nudity)",
    )
    iterations: int = Field(40, ge=1, description="Adam steps per time step (`iteration`)")
    timesteps: int = Field(
        50, ge=1, description="time steps the attack walks, one round each (`n_samples`)"
    )
    lr: float = Field(0.01, gt=0, description="Adam learning rate (`text_grad.lr`)")
    weight_decay: float = Field(
        0.1, ge=0, description="Adam weight decay (`text_grad.weight_decay`)"
    )
    criterion: Literal["l2", "l1"] = Field("l2", description="denoising loss (`criterion`)")


class AttackSettings(_Settings):
    """Erasure under attack (`snakemake attacks`): prompts searched to bring a concept back,
    sampled by every method and judged as the target's own images."""

    images_per_prompt: int = Field(
        10,
        ge=1,
        description="images per attack prompt and method, at the seeds of its base prompt's "
        "first images in Table 1 (at most `sample.images_per_prompt`: pre-ASR reads those)",
    )
    ring_a_bell: RingABellSettings | None = Field(
        RingABellSettings(), description="Ring-A-Bell's settings, or `null`: no Ring-A-Bell"
    )
    unlearndiffatk: UnlearnDiffAtkSettings = Field(
        UnlearnDiffAtkSettings(), description="UnlearnDiffAtk's settings (opt-in: `concepts`)"
    )

    def attack_params(self, name: str) -> dict | None:
        """One attack's settings for its rules' params (`None` when it is off)."""
        settings = getattr(self, name)
        return settings.as_params() if settings else None

    @property
    def prompt_attacks(self) -> list[str]:
        """The attacks that search prompts once per concept (sampled by every method)."""
        return ["ring_a_bell"] if self.ring_a_bell else []


class AuditSettings(_Settings):
    """How far to trust the judge: a second judge on the same images, and a sheet for humans."""

    second_judge: str = Field(
        "clip",
        description="`clip` (a zero-shot CLIP classifier over the target and its retains) or "
        "a second judge `module:function` (the toy world's labelled renders, "
        "`crce_worlds.toy.audit:labelled_renders`: the judge's accuracy against ground truth)",
    )
    template: str = Field("a photo of {}", pattern=r"[{][}]", description="CLIP's text for a label")
    per_concept: int = Field(8, ge=1, description="images per concept on the sheet for people")
    seed: int = Field(0, description="which images the sheet shows (and the renders)")
    renders: int = Field(200, ge=2, description="labelled renders per concept (a renders judge)")

    def second_judge_params(self) -> dict:
        """What the second judge reads (the sheet's size is `judge_audit`'s alone)."""
        return self.model_dump(mode="json", exclude={"per_concept"})


class SweepSettings(_Settings):
    """Paper Table 6: one method trained at every (M, N) of a grid."""

    n_corefs: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="M: corefs drawn per iteration (each at most `split.n_train`)"
    )
    n_retains: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, description="N: retains drawn per iteration (each at most `split.n_train`)"
    )
    categories: list[Category] = Field(
        min_length=1, description="the categories whose concepts the sweep runs on"
    )
    method: str = Field(
        description="the Table 1 method (one that draws M corefs and N retains) whose "
        "settings every cell takes"
    )
