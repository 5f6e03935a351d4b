"""MACE, mass concept erasure (Lu et al., CVPR 2024), as its code runs it (Shilin-LU/MACE at
057e7a6: training.py, src/cfr_lora_training.py, src/cfr_utils.py, src/dataset.py,
src/mace_lora_atten_processor.py, src/fuse_lora_close_form.py, src/cache_coco.py,
inference.py, configs/), re-implemented (its files import torchvision).

Three stages in one erase job, on every attn2 to_k / to_v weight W (32 in SD v1.4):
1. closed-form cross-attention refinement, CFR (cfr_lora_training.py L259-326,
   cfr_utils.py L59-204): `aug_length` prompts of its templates with the target ("old") and
   the same templates with the category's `mapping` concept ("new"); the tokens the two share
   before and after the concept (and the padding after them) pair an old embedding c with a
   new one c*, and W' = (lamb W + sum W c* c^T + s P1)(lamb I + sum c c^T + s P2)^-1, P the
   preservation caches (below). The concept's own tokens are not in the sums: what moves is
   what the words around it (and the padding, which reads it) carry of it.
2. one rank-`rank` LoRA per concept on W' (to_k and to_v; mace_lora_atten_processor.py,
   diffusers' LoRALinearLayer: down ~ N(0, 1/rank), up = 0), trained by AdamW (wd 1e-2,
   gradient norm clipped to 1.0) for `iterations` steps of one image: the loss is the sum
   over attn2 layers of the Frobenius norm of the attention probabilities at the concept's
   token positions (its tokens, and every <|endoftext|> with `use_pooler`) over the image
   queries inside the concept's mask (cfr_utils.py L212-253; a style has no mask: every
   query), a random augmented prompt per step, timesteps drawn with its relation-focal
   importance weights (cfr_utils.py L207-209) when `importance_sampling`.
3. closed-form fusion (fuse_lora_close_form.py L73-175): W'' = (lamb W' + sum (W' + dW) c c^T
   + f P1)(lamb I + sum c c^T + f P2)^-1, the sums over every token of the augmented
   prompts (`all_words`), dW the LoRA's up @ down; one concept per model here (the sets issue
   fuses many).

The preservation caches are sums over prompts' every token, with the base model's W as
targets (cache_coco.py): P2 = sum c c^T, P1 = W0 P2, so each is one gram matrix of the text
encoder's states (stored once per model and caption file, rule `mace_cache`). The prior
cache is MS-COCO captions; the domain cache (`preserve_weight`) is a caption file per category
(`domain_prompts`: the official caches are a download of the authors' whose prompts the code
does not show, so none by default), or `domain: retains`, built in the job from the concept's
train retains (a variant).

The images are the target's from the base model (`reference_images`: inference.py L27-38,
8 images of "a photo of the {}", DPM-Solver 30 steps, guidance 7.5), with masks from the
set's segmenter (crce.masks) for objects and celebrities (the configs' `object` type).

Randomness: the prompts' sample from derive_seed("mace-prompts", seed); the LoRA's init from
("mace-lora", seed); step k (the engine's generator) draws the prompt, the noise, then the
timestep; the image follows a fresh permutation per epoch ("mace-epoch", seed, epoch), as a
shuffling data loader of batch 1 does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..seeds import derive_seed
from .base import IterativeMethod, IterativeSettings, ParamSet, ReferenceRequest

log = logging.getLogger(__name__)

# cfr_utils.py L257-343, prompt_augmentation: its object and style templates, in order.
OBJECT_TEMPLATES = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}",
    "An illustration of {}", "A digital rendering of {}", "A visual representation of {}",
    "A graphic of {}", "A shot of {}", "A photo of {}", "A black and white image of {}",
    "A depiction in portrait form of {}", "A scene depicting {} during a public gathering",
    "{} captured in an image", "A depiction created with oil paints capturing {}",
    "An image of {}", "A drawing capturing the essence of {}",
    "An official photograph featuring {}", "A detailed sketch of {}",
    "{} during sunset/sunrise", "{} in a detailed portrait", "An official photo of {}",
    "Historic photo of {}", "Detailed portrait of {}", "A painting of {}", "HD picture of {}",
    "Magazine cover capturing {}", "Painting-like image of {}", "Hand-drawn art of {}",
    "An oil portrait of {}", "{} in a sketch painting",
)  # fmt: skip
STYLE_TEMPLATES = (
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art",
    "Latest masterpiece by {}", "A stunning image by {}", "An art in {}'s style",
    "Exhibition artwork of {}", "Art display by {}", "a beautiful painting by {}",
    "An image inspired by {}'s style", "A sketch by {}", "Art piece representing {}",
    "A drawing by {}", "Artistry showcasing {}", "An illustration by {}",
    "A digital art by {}", "A visual art by {}",
    "A reproduction inspired by {}'s colorful, expressive style", "Famous painting of {}",
    "A famous art by {}", "Artistic style of {}", "{}'s famous piece", "Abstract work of {}",
    "{}'s famous drawing", "Art from {}'s early period", "A portrait by {}",
    "An imitation reflecting the style of {}", "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}", "Artistic image influenced by {}",
)  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
IMAGE_PROMPTS = {"object": "a photo of the {}", "style": "a photo in the style of {}"}
PRIOR_FOLDER = "results/mace"
GSAM = "gsam"  # crce.masks.GSAM (that module imports numpy: not at the Snakefile's parse)


class MaceCategory(BaseModel):
    """The official config of one kind of concept (unset keys: configs/object/erase_ship.yaml's;
    a category's keys given alone keep its other defaults, DEFAULT_CATEGORIES)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept_type: Literal["object", "style"] = Field(
        "object",
        description="its templates, image prompt and masks: `object` (objects and "
        "celebrities in the configs, masked) or `style` (art: no mask)",
    )
    mapping: str = Field("ground", description="`mapping_concept`: what the refinement maps it to")
    lamb: float = Field(1e3, ge=0, description="`lamb`: the pull of both solves towards W")
    lr: float = Field(1e-5, gt=0, description="`learning_rate` of the LoRA")
    train_preserve_scale: float = Field(
        0.0, ge=0, description="the caches' weight in the refinement"
    )
    fuse_preserve_scale: float = Field(0.0, ge=0, description="the caches' weight in the fusion")
    preserve_weight: float = Field(0.0, ge=0, description="the domain cache's weight beside COCO's")
    domain_prompts: str | None = Field(
        None,
        description="the domain cache's captions (a URL or a CSV with a `prompt` or `caption` "
        "column, e.g. other celebrities to keep; rule `mace_cache`); null: none",
    )
    domain_prompts_sha256: str | None = Field(None, description="their sha256 (null: unchecked)")
    mask_label: str | None = Field(
        None,
        description="what the detector looks for (null: the concept's text, as "
        "data_preparation_transformers.py passes its folder name)",
    )


# configs/object/erase_ship.yaml, configs/celebrity/erase_cele_1.yaml (its mapping from
# erase_cele_5/10/100: 'a person'; cele_1's 'a woman' is its one concept's), configs/art/
# erase_art_100.yaml (IP characters as the art config: no mask).
DEFAULT_CATEGORIES = {
    "object": MaceCategory(concept_type="object", mapping="ground", lamb=1e3, lr=1e-5,
                           train_preserve_scale=0.0, fuse_preserve_scale=0.0,
                           preserve_weight=0.0),
    "celebrity": MaceCategory(concept_type="object", mapping="a person", lamb=0.0, lr=1e-4,
                              train_preserve_scale=1e-4, fuse_preserve_scale=1e-4,
                              preserve_weight=8e3),
    "ip": MaceCategory(concept_type="style", mapping="art", lamb=0.0, lr=1e-4,
                       train_preserve_scale=1e-4, fuse_preserve_scale=1e-4,
                       preserve_weight=8e4),
}  # fmt: skip


class MaceSettings(IterativeSettings):
    params: ParamSet = Field("xattn-kv", description="not read: the LoRA is on attn2 to_k / to_v")
    lr: float = Field(1e-5, gt=0, description="not read: each category's `lr` is the LoRA's")
    iterations: int = Field(50, ge=1, description="LoRA steps (configs `max_train_steps` 50)")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="the LoRA's precision (official `mixed_precision: null`)"
    )
    categories: dict[str, MaceCategory] = Field(
        default_factory=lambda: dict(DEFAULT_CATEGORIES),
        description="per category (object, celebrity, ip) its official config's values",
    )
    rank: int = Field(1, ge=1, description="the LoRA's rank (configs 1)")
    aug_length: int = Field(30, ge=1, description="augmented prompts per concept (configs 30)")
    prompt_len: int = Field(
        30, ge=1, description="templates drawn from: the first `prompt_len` (configs 30 of 31)"
    )
    templates: list[str] | None = Field(
        None,
        description="the augmentation templates, `{}` the concept (null: the code's 31 for "
        "the category's type, cfr_utils.py L257-343)",
    )
    image_prompt: str | None = Field(
        None,
        description="the prompt of its images (null: inference.py's `a photo of the {}`, or "
        "`a photo in the style of {}` for a style)",
    )
    use_pooler: bool = Field(True, description="the <|endoftext|> positions are the concept's")
    importance_sampling: bool = Field(
        True, description="timesteps by its relation-focal weights (configs true)"
    )
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (configs 1e-2)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (configs 1.0)")
    images: int = Field(8, ge=1, description="images of the concept (inference.py: 8)")
    image_steps: int = Field(30, ge=1, description="their DPM-Solver steps (inference.py 30)")
    image_guidance: float = Field(7.5, description="their guidance (inference.py 7.5)")
    segmenter: str = Field(
        "gsam",
        description="what masks an object's images (crce.masks): `gsam` (GroundingDINO + "
        "SAM, the code's transformers route) or `module:Class`",
    )
    box_threshold: float = Field(0.3, gt=0, lt=1, description="the detector's box threshold")
    detector: str = Field(
        "IDEA-Research/grounding-dino-base",
        description="`gsam`'s GroundingDINO: a hub id (fetched by `download`) or a folder",
    )
    sam: str = Field("facebook/sam-vit-huge", description="`gsam`'s SAM: a hub id or a folder")
    mask_models_build: str | None = Field(
        None,
        description="a builder `module:function` writing the detector and SAM folders (the "
        "test world's tiny ones, rule `mask_models`); null: they are downloaded",
    )
    preserve_squared: bool = Field(
        False,
        description="`true`: the refinement weighs the caches by train_preserve_scale squared, "
        "as the code does (cfr_lora_training.py L309-322 scales them, then "
        "closed_form_refinement scales again); `false`: once, as the paper's objective",
    )
    domain: Literal["none", "retains"] = Field(
        "none",
        description="where a category without `domain_prompts` gets a domain cache: `none` "
        "(the authors' cache files are a download whose prompts the code does not show) or "
        "`retains` (the concept's train retains through its templates: a variant)",
    )
    prior_prompts: str = Field(
        "https://raw.githubusercontent.com/rohitgandikota/erasing/"
        "3d10dd1b2df4ec4e74edcadac4200c7401585138/data/coco_30k.csv",
        description="the prior cache's captions: a URL or a local CSV with a `prompt` or "
        "`caption` column (default the MS-COCO 30k list; the code caches all 2014 captions)",
    )
    prior_prompts_sha256: str | None = Field(
        "42c57b188c8f1f8a77cddfa11cde89e83fcbdd4dcd4fc6c840fb4e046d395383",
        description="their sha256 (null: not checked)",
    )

    @field_validator("categories", mode="before")
    @classmethod
    def _over_defaults(cls, given):
        """A category's keys given alone keep its other official values."""
        if not isinstance(given, dict):
            return given
        merged = {k: v.model_dump() for k, v in DEFAULT_CATEGORIES.items()}
        for name, values in given.items():
            if isinstance(values, BaseModel):
                values = values.model_dump()
            merged[name] = {**merged.get(name, {}), **(values or {})}
        return merged

    def category(self, name: str) -> MaceCategory:
        found = self.categories.get(name)
        if found is None:
            raise ValueError(f"mace has no settings for category {name!r} (`categories`)")
        return found

    def needs_prior(self) -> bool:
        return any(c.train_preserve_scale or c.fuse_preserve_scale
                   for c in self.categories.values())  # fmt: skip


# -- stage 1: prompts and the refinement ---------------------------------------------------
def augmented_prompts(text: str, concept_type: str, settings: MaceSettings, seed: int):
    """The `aug_length` templates drawn (dataset.py L145: random.sample(range(prompt_len),
    aug_length), those past the templates dropped), filled with `text`."""
    import torch

    templates = settings.templates or TEMPLATES[concept_type]
    count = min(settings.aug_length, settings.prompt_len)
    generator = torch.Generator().manual_seed(derive_seed("mace-prompts", seed))
    drawn = torch.randperm(settings.prompt_len, generator=generator)[:count].tolist()
    return [templates[i].format(text) for i in drawn if i < len(templates)]


def matching_indices(old: list[int], new: list[int]) -> tuple[list[int], list[int]]:
    """The positions of the tokens two sequences share before and after where they differ
    (cfr_utils.py L10-30, find_matching_indices)."""
    start = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    head = list(range(start))
    return head + list(range(end_old + 1, len(old))), head + list(range(end_new + 1, len(new)))


def aligned_positions(old: list[int], new: list[int], length: int):
    """Paired positions of the padded sequences (cfr_utils.py L101-112): the shared tokens,
    then the padding after each, as many as the longer one leaves."""
    old_i, new_i = matching_indices(old, new)
    shift = old_i[-1] - new_i[-1]
    if shift >= 0:
        return (old_i + list(range(old_i[-1] + 1, length)),
                new_i + list(range(new_i[-1] + 1, length - shift)))  # fmt: skip
    return (old_i + list(range(old_i[-1] + 1, length + shift)),
            new_i + list(range(new_i[-1] + 1, length)))  # fmt: skip


def states(pipe, prompts: list[str]):
    """[n, L, D]: the text encoder's last hidden states, in fp64."""
    from ..modeling import encode_prompts

    return encode_prompts(pipe, prompts).double()


def token_ids(tokenizer, text: str) -> list[int]:
    """A prompt's tokens, start and end included, unpadded (truncated as the encoder reads)."""
    return tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids


def refinement_sums(pipe, olds: list[str], news: list[str]):
    """(cross, gram) of the refinement: sum c* c^T and sum c c^T over the paired positions,
    D x D each (the targets are W c*, so every layer's sum is W @ cross)."""
    old_states, new_states = states(pipe, olds), states(pipe, news)
    length = old_states.shape[1]
    cross = old_states.new_zeros(old_states.shape[2], old_states.shape[2])
    gram = cross.clone()
    for k, (old, new) in enumerate(zip(olds, news, strict=True)):
        i, j = aligned_positions(token_ids(pipe.tokenizer, old), token_ids(pipe.tokenizer, new),
                                 length)  # fmt: skip
        c, c_new = old_states[k, i], new_states[k, j]
        cross += c_new.T @ c
        gram += c.T @ c
    return cross, gram


def prompt_gram(pipe, prompts: list[str], batch_size: int = 256):
    """sum c c^T over every token of every prompt (cache_coco.py with `all_words`), fp64."""
    gram = None
    for start in range(0, len(prompts), batch_size):
        found = states(pipe, prompts[start : start + batch_size]).flatten(0, 1)
        part = found.T @ found
        gram = part if gram is None else gram + part
    return gram


def edited_weights(unet) -> dict:
    """Every attn2 to_k / to_v weight by UNet name (what MACE edits: get_ca_layers)."""
    from .uce import edited_names

    parameters = dict(unet.named_parameters())
    return {n: parameters[n] for n in edited_names(unet)}


def cache_weight(category: MaceCategory, fusion: bool, squared: bool) -> float:
    """The caches' weight in a solve (module docstring; `preserve_squared`)."""
    if fusion:
        return category.fuse_preserve_scale
    scale = category.train_preserve_scale
    return scale * scale if squared else scale


def solve(weights: dict, lamb: float, cross: dict, gram, cache, weight: float) -> dict:
    """Each W' = (lamb W + cross_W + weight W0 P)(lamb I + gram + weight P)^-1, where
    `cross[name]` is that layer's sum of targets times contexts, W0 the base weights and P
    the combined cache gram (None: none); fp64 in, fp32 on the CPU out."""
    from ..closed_form import gram_edit

    out = {}
    for name, (w, w0) in weights.items():
        total_cross, total_gram = cross[name], gram
        if cache is not None and weight:
            total_cross, total_gram = total_cross + weight * w0 @ cache, gram + weight * cache
        out[name] = gram_edit(w, lamb, total_cross, total_gram).float().cpu().contiguous()
    return out


# -- stage 2: the LoRA and its attention loss ------------------------------------------------
def importance_weights(steps: int, temperature: float = 0.05):
    """cfr_utils.py L207-209: sigmoid(T (t - 200)) - sigmoid(T (t - 400)), normalised."""
    import torch

    t = torch.arange(steps, dtype=torch.float64)
    f = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return f / f.sum()


def masked_attention(probs, positions, mask):
    """The probabilities the loss reads (cfr_utils.py L223-238): [heads x batch, queries,
    tokens] at the concept's token positions, over the queries inside `mask` (a boolean
    image-sized mask resized by nearest to the layer's square grid) or every query."""
    import torch.nn.functional as F

    if mask is not None:
        side = math.isqrt(probs.shape[1])
        grid = F.interpolate(mask[None, None].float(), size=(side, side), mode="nearest")
        probs = probs[:, (grid > 0.5).view(-1).to(probs.device)]
    return probs[..., positions.to(probs.device)]


class LoraAttention:
    """attn2's processor with a rank-r LoRA on to_k and to_v (key = W' c + up down c), keeping
    the norm of each call's probabilities at the recorder's positions and mask. A plain
    object, not a Module: its tensors stay out of the UNet's parameters."""

    def __init__(self, module, rank: int, generator, recorder):
        import torch

        d_in, d_out = module.to_k.in_features, module.to_k.out_features
        device, dtype = module.to_k.weight.device, torch.float32
        self.factors = {}
        for part in ("to_k", "to_v"):
            down = torch.randn((rank, d_in), generator=generator, dtype=dtype) / rank
            self.factors[f"{part}.down"] = down.to(device).requires_grad_(True)
            self.factors[f"{part}.up"] = torch.zeros((d_out, rank), device=device,
                                                     dtype=dtype, requires_grad=True)  # fmt: skip
        self.recorder = recorder

    def lora(self, part: str, x):
        down, up = self.factors[f"{part}.down"], self.factors[f"{part}.up"]
        return (x.to(down.dtype) @ down.T) @ up.T

    def product(self, part: str):
        return self.factors[f"{part}.up"].detach() @ self.factors[f"{part}.down"].detach()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None):  # fmt: skip
        import torch

        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.to_k(context) + self.lora("to_k", context).to(context.dtype)
        value = attn.to_v(context) + self.lora("to_v", context).to(context.dtype)
        key, value = attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.recorder.active:
            kept = masked_attention(probs, self.recorder.positions, self.recorder.mask)
            self.recorder.norms.append(kept.float().norm())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


class Recorder:
    """What the processors read this step (AttnController.set_concept_positions)."""

    def __init__(self):
        self.active, self.positions, self.mask, self.norms = False, None, None, []


class Mace(IterativeMethod):
    """MACE: refinement, one LoRA, fusion (one method per job)."""

    name = "mace"
    Settings = MaceSettings
    section = "mace"
    optimizer = "AdamW"

    @classmethod
    def references(cls, settings, concept):
        category = settings.category(concept["category"])
        masks = None
        if category.concept_type == "object":
            masks = {"segmenter": settings.segmenter,
                     "label": category.mask_label or concept["text"],
                     "threshold": settings.box_threshold}  # fmt: skip
            if settings.segmenter == GSAM:
                masks |= {"detector": settings.detector, "sam": settings.sam}
        prompt = (settings.image_prompt or IMAGE_PROMPTS[category.concept_type]).format(
            concept["text"]
        )
        return [ReferenceRequest("instances", (prompt,), settings.images,
                                 steps=settings.image_steps, guidance=settings.image_guidance,
                                 scheduler="dpmsolver", masks=masks)]  # fmt: skip

    @classmethod
    def job_inputs(cls, settings, concept_id):
        return [caption_file(prompts, sha256) for prompts, sha256 in caches_of(settings)]

    @classmethod
    def config_problems(cls, settings, *, n_train):
        from ..constants import CATEGORIES

        missing = [c for c in CATEGORIES if c not in settings.categories]
        return [f"mace: `categories` lacks {', '.join(missing)}"] if missing else []

    def texts(self) -> list[str]:
        return self.olds

    def trainable(self, unet) -> list[str]:
        return []  # the LoRA's factors are its `extra_parameters`

    def extra_parameters(self, engine) -> dict:
        return {f"{name}.{k}": t for name, processor in self.processors.items()
                for k, t in processor.factors.items()}  # fmt: skip

    def optimizer_kwargs(self):
        return {"lr": self.category_settings.lr, "betas": (0.9, 0.999), "eps": 1e-8,
                "weight_decay": self.settings.weight_decay}  # fmt: skip

    def max_grad_norm(self):
        return self.settings.max_grad_norm

    @classmethod
    def objective(cls, engine, methods):
        return LoraObjective(engine, methods)

    def delta_metadata(self):
        c = self.category_settings
        return {"mapping": c.mapping, "concept_type": c.concept_type, "prompts": self.olds,
                "masked": self.masks is not None}  # fmt: skip

    # -- the job ---------------------------------------------------------------------------
    @classmethod
    def erase(cls, job, methods):
        import torch

        from ..training import TrainingError
        from ..training.engine import Engine

        ((name, method),) = methods.items()
        s = method.settings
        category = method.category_settings = s.category(job.concept["category"])
        found = job.references.get("instances")
        if found is None:
            raise TrainingError(f"{method.target}: MACE's images of the concept were not given")
        method.masks = found.masks if category.concept_type == "object" else None
        if category.concept_type == "object" and method.masks is None:
            raise TrainingError(f"{method.target}: MACE's images of the concept have no masks "
                                "(their reference set was drawn without a segmenter)")  # fmt: skip
        pipe = job.pipe
        weights = edited_weights(pipe.unet)
        base = {n: w.detach().double().clone() for n, w in weights.items()}
        cache = method.cache(pipe)
        with torch.no_grad():
            refined = method.refine(pipe, base, cache)
            for n, w in weights.items():
                w.copy_(refined[n].to(w))
        method.install_lora(pipe.unet)
        engine = Engine(pipe, methods, seed=job.seed, runtime=job.runtime,
                        references=job.references)  # fmt: skip
        summary = engine.train(job.checkpoint_dir)[name]
        with torch.no_grad():
            fused = method.fuse(pipe, base, refined, cache)
        return {name: (fused, summary)}

    def refine(self, pipe, base: dict, cache) -> dict:
        """Stage 1: the refined weights (UNet names, fp32 on the CPU) from the base's."""
        c, s = self.category_settings, self.settings
        self.olds = augmented_prompts(self.target, c.concept_type, s, self.seed)
        news = augmented_prompts(c.mapping, c.concept_type, s, self.seed)
        cross, gram = refinement_sums(pipe, self.olds, news)
        return solve({n: (w, w) for n, w in base.items()}, c.lamb,
                     {n: w @ cross for n, w in base.items()}, gram, cache,
                     cache_weight(c, False, s.preserve_squared))  # fmt: skip

    def install_lora(self, unet) -> None:
        """Stage 2's processors on every attn2, their factors drawn in module order."""
        import torch

        from ..training import TrainingError

        generator = torch.Generator().manual_seed(derive_seed("mace-lora", self.seed))
        self.recorder, self.processors = Recorder(), {}
        for module_name, module in unet.named_modules():
            if module_name.endswith("attn2"):
                processor = LoraAttention(module, self.settings.rank, generator, self.recorder)
                module.set_processor(processor)
                self.processors[module_name] = processor
        if not self.processors:
            raise TrainingError(f"{self.target}: MACE found no attn2 layer in the UNet")

    def cache(self, pipe):
        """The combined preservation gram P_prior + preserve_weight P_domain (None: none)."""
        c, s = self.category_settings, self.settings
        if not (c.train_preserve_scale or c.fuse_preserve_scale):
            return None
        prior = read_cache(prior_file(s)).to(pipe.text_encoder.device)
        if c.domain_prompts and c.preserve_weight:
            domain = read_cache(caption_file(c.domain_prompts, c.domain_prompts_sha256))
            return prior + c.preserve_weight * domain.to(prior.device)
        if s.domain == "retains" and c.preserve_weight:
            texts = [i.text for i in self.split.retain_train]
            prompts = [p for t in texts for p in augmented_prompts(t, c.concept_type, s, self.seed)]
            if prompts:
                prior = prior + c.preserve_weight * prompt_gram(pipe, prompts)
        return prior

    def fuse(self, pipe, base: dict, refined: dict, cache) -> dict:
        """Stage 3 for one LoRA: targets (W' + dW) c over every token of the prompts."""
        c = self.category_settings
        gram = prompt_gram(pipe, self.olds)
        weights, cross = {}, {}
        for name, w in refined.items():
            module, part = name.removesuffix(".weight").rsplit(".", 1)
            w = w.to(gram)
            lora = self.processors[module].product(part).to(gram)
            weights[name] = (w, base[name])
            cross[name] = (w + lora) @ gram
        return solve(weights, c.lamb, cross, gram, cache, cache_weight(c, True, False))


class LoraObjective:
    """One LoRA step (cfr_lora_training.py L470-553)."""

    def __init__(self, engine, methods):
        import torch
        from diffusers import DDPMScheduler

        from .fmn import concept_positions

        ((self.name, self.method),) = methods.items()
        method = self.method
        self.engine, self.last_step = engine, {}
        found = engine.references["instances"]
        self.latents = found.latents.to(engine.device, engine.dtype)
        self.masks = None if method.masks is None else method.masks.bool()
        self.positions = [concept_positions(engine.pipe.tokenizer, p, method.target,
                                            method.settings.use_pooler) for p in method.olds]  # fmt: skip
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        steps = self.scheduler.config.num_train_timesteps
        self.weights = importance_weights(steps) if method.settings.importance_sampling else None
        self.recorder = method.recorder
        self.torch = torch

    def losses(self, iteration: int):
        from .fmn import epoch_order

        torch, engine, method = self.torch, self.engine, self.method
        n = len(self.latents)
        epoch, position = divmod(iteration, n)
        item = int(epoch_order("mace-epoch", engine.seed, epoch, n)[position])
        generator = engine.generator(iteration)
        prompt = int(torch.randint(0, len(method.olds), (1,), generator=generator))
        latent = self.latents[item : item + 1]
        noise = torch.randn(latent.shape, generator=generator).to(latent)
        steps = self.scheduler.config.num_train_timesteps
        if self.weights is None:
            t = torch.randint(0, steps, (1,), generator=generator)
        else:
            t = torch.multinomial(self.weights, 1, generator=generator)
        noisy = self.scheduler.add_noise(latent, noise, t)
        context = engine.prompts.of([method.olds[prompt]]).to(engine.dtype)
        r = self.recorder
        r.active, r.norms = True, []
        r.positions = self.positions[prompt]
        r.mask = None if self.masks is None else self.masks[item]
        engine.predict(noisy, t.to(engine.device), context, [1])
        r.active = False
        self.last_step = {"item": item, "prompt": prompt, "timestep": int(t)}
        return {self.name: torch.stack(r.norms).sum().to(engine.dtype)}


# -- the preservation caches (rule mace_cache) ----------------------------------------------
def caption_params(prompts: str, sha256: str | None) -> dict:
    """What decides a cache beside the model (the rule's params add it)."""
    return {"prompts": prompts, "sha256": sha256}


def caption_file(prompts: str, sha256: str | None) -> str:
    canonical = json.dumps(caption_params(prompts, sha256), sort_keys=True, separators=(",", ":"))
    return f"{PRIOR_FOLDER}/cache-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}.safetensors"


def prior_file(settings: MaceSettings) -> str:
    return caption_file(settings.prior_prompts, settings.prior_prompts_sha256)


def caches_of(settings: MaceSettings) -> list[tuple[str, str | None]]:
    """The caption files a MACE method's jobs read: the prior's, each category's domain's."""
    if not settings.needs_prior():
        return []
    found = [(settings.prior_prompts, settings.prior_prompts_sha256)]
    for c in settings.categories.values():
        if c.domain_prompts and c.preserve_weight:
            found.append((c.domain_prompts, c.domain_prompts_sha256))
    return found


def cache_sources(settings_list) -> dict[str, dict]:
    """Each cache's captions by key (the rules' params)."""
    found = {}
    for settings in settings_list:
        if isinstance(settings, MaceSettings):
            for prompts, sha256 in caches_of(settings):
                key = caption_file(prompts, sha256).rsplit("cache-", 1)[1]
                found[key.removesuffix(".safetensors")] = caption_params(prompts, sha256)
    return found


def mask_models(settings_list) -> dict[str, list[str]]:
    """The GroundingDINO and SAM models MACE methods load: {"download": hub ids, builder:
    the folders it writes}."""
    found: dict[str, list[str]] = {}
    for settings in settings_list:
        if isinstance(settings, MaceSettings) and settings.segmenter == GSAM:
            key = settings.mask_models_build or "download"
            found.setdefault(key, [])
            found[key] += [m for m in (settings.detector, settings.sam) if m not in found[key]]
    return found


def read_cache(path: str):
    from safetensors.torch import load_file

    from ..files import damaged, rebuild_hint

    try:
        return load_file(path)["gram"].double()
    except Exception as err:  # a missing or damaged file
        raise damaged(path, err, rebuild_hint(path)) from None


def read_captions(path: str) -> list[str]:
    """A CSV's `prompt` (or `caption`) column (the train env has no pandas)."""
    import csv

    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        column = next((c for c in ("prompt", "caption") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{path}: no `prompt` or `caption` column ({reader.fieldnames})")
        return [row[column] for row in reader if row[column]]


def write_cache(*, model: str, prompts_csv: str, output: str, device: str = "auto") -> None:
    """The rule `mace_cache`: the captions' gram under the base model's text encoder."""
    from pathlib import Path

    from safetensors.torch import save_file

    from ..modeling import device_for, load_pipeline

    prompts = read_captions(prompts_csv)
    pipe = load_pipeline(model, device=device_for(device))
    gram = prompt_gram(pipe, prompts)
    tmp = Path(output).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file({"gram": gram.cpu().contiguous()}, str(tmp),
              {"prompts": str(len(prompts)), "model": model})  # fmt: skip
    tmp.replace(output)
    log.info("preservation cache of %d captions: %s", len(prompts), output)
