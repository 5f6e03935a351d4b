"""Forget-Me-Not, FMN (Zhang et al., 2023), as its code runs it (SHI-Labs/Forget-Me-Not at
a4a81e8: configs/attn.yaml, configs/ti.yaml, src/train_attn.py, src/train_ti.py,
src/dataset.py).

Two stages in one erase job:
1. textual inversion (train_ti.py L262-361, `use_ti: true`): `ti_tokens` new tokens
   <s1>..<s4>, initialised from the target's own tokens then N(0, 1) (`elon|musk|<rand-1>|
   <rand-1>`), trained by AdamW (lr 1e-3, weight decay 0.1) on the denoising loss of the
   target's images under "a photo of <s1><s2><s3><s4>" (the UNet and text encoder frozen);
   after each step their norms are pulled a tenth of the way to 0.4 (`clip_ti_decay`);
2. attention re-steering (train_attn.py L272-573): the loss is the norm of the attention
   probabilities, over every attn2 layer, every head and every image query, at the
   concept's token positions in "a photo of <s1><s2><s3><s4>" (every <|endoftext|> position
   too, `use_pooler`: on SD v1.4 the padding is that token, so every padding position),
   minimised by AdamW (lr 2e-6, weight decay 1e-2) on the whole UNet for 35 steps of one
   image. Without TI the concept's positions are the target text's own tokens.

Its configs' base is SD 2.1-base (whose padding is "!": `use_pooler` marks one position
there); this study's base is SD v1.4. The target's images come from the base model
(`reference_images`, "a photo of {target}"; the official trains on 10 real photos). The
delta keeps the UNet tensors the steps changed (the tensors past the last attn2 get no
gradient and stay the base's).

Randomness: the placeholders' random init from derive_seed("fmn-ti-init", seed); TI step k
from ("fmn-ti", seed, k): the flip, the noise, the timestep; each stage walks its images in a
fresh permutation per epoch (("fmn-ti-epoch" | "fmn-epoch", seed, epoch)), as a shuffling
data loader of batch 1 does; attention step k draws the noise then the timesteps from the
engine's generator.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..seeds import derive_seed
from .base import IterativeMethod, IterativeSettings, ParamSet, ReferenceRequest

log = logging.getLogger(__name__)

PROMPT = "a photo of {}"  # train_attn.py L92 and dataset.py's OBJECT_TEMPLATE


class FmnSettings(IterativeSettings):
    params: ParamSet = Field(
        "full",
        description="trained tensors: `full` (official `only_optimize_ca: false`) or `xattn` "
        "(`only_optimize_ca: true`: every attn2 parameter)",
    )
    lr: float = Field(2e-6, gt=0, description="AdamW learning rate (configs/attn.yaml 2e-6)")
    iterations: int = Field(35, ge=1, description="optimiser steps (configs/attn.yaml 35)")
    batch_size: int = Field(1, ge=1, description="images per step (configs/attn.yaml 1)")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="`float32` (both official stages: `mixed_precision: null`, and fp32 "
        "inversion) or `bfloat16` (weights loaded in bf16: a delta of the whole UNet then "
        "carries bf16 rounding larger than 35 steps at 2e-6 move it)",
    )
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (official 1e-2)")
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="gradient clipping: none, as the code runs with the whole UNet (its "
        "clip_grad_norm_ gets the generator the optimiser already consumed, "
        "train_attn.py L394-395, L568-569); set 1.0 (its configured value, which the code "
        "applies with `only_optimize_ca`) with `params: xattn`",
    )
    use_pooler: bool = Field(
        True, description="the <|endoftext|> positions count as the concept's (official true)"
    )
    use_ti: bool = Field(
        True, description="learn the concept's tokens first, textual inversion (official true)"
    )
    ti_tokens: int = Field(4, ge=1, description="its new tokens <s1>.. (configs/ti.yaml 4)")
    ti_iterations: int = Field(500, ge=1, description="its steps (configs/ti.yaml 500)")
    ti_lr: float = Field(1e-3, gt=0, description="its AdamW lr (configs/ti.yaml 1e-3)")
    ti_weight_decay: float = Field(0.1, ge=0, description="its weight decay (configs/ti.yaml)")
    ti_norm: float | None = Field(
        0.4,
        description="`clip_ti_decay`: each step pulls the tokens' norms 100 x lr of the way "
        "to this (train_ti.py L329-346); null: off",
    )
    images: int = Field(10, ge=1, description="images of the target (official: 10 photos)")
    prompt: str = Field(
        PROMPT,
        description="the template of its prompts, with `{}` (official `object`; `a photo in "
        "the style of {}` for a style)",
    )


def placeholder_names(count: int) -> list[str]:
    return [f"<s{k + 1}>" for k in range(count)]


@contextlib.contextmanager
def placeholders(pipe, rows):
    """A tokenizer that knows <s1>..<sN> and the pipe's text encoder reading them as `rows`,
    restored on exit."""
    from ..modeling import extended_embedding

    tokenizer = copy.deepcopy(pipe.tokenizer)
    names = placeholder_names(len(rows))
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"the tokenizer gave its new tokens ids {ids}, not consecutive ones")
    encoder = pipe.text_encoder
    base = encoder.get_input_embeddings()
    encoder.set_input_embeddings(extended_embedding(base, rows, ids[0]))
    try:
        yield tokenizer
    finally:
        encoder.set_input_embeddings(base)


def token_ids(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # fmt: skip


def concept_positions(tokenizer, prompt: str, snippet: str, use_pooler: bool):
    """The prompt's positions the loss reads (train_attn.py L131-153): every run of the
    snippet's tokens, and with `use_pooler` every <|endoftext|> position."""
    import torch

    ids = token_ids(tokenizer, [prompt])[0].tolist()
    concept = tokenizer(snippet, add_special_tokens=False).input_ids
    pooler = tokenizer("<|endoftext|>", add_special_tokens=False).input_ids[0]
    positions = [False] * len(ids)
    for i, token in enumerate(ids):
        if token == concept[0] and ids[i : i + len(concept)] == concept:
            positions[i : i + len(concept)] = [True] * len(concept)
        if use_pooler and token == pooler:
            positions[i] = True
    return torch.tensor(positions)


def initial_rows(pipe, target: str, count: int, seed: int):
    """The placeholders' start: the target's first tokens' embeddings, then N(0, 1)
    (configs/ti.yaml `elon|musk|<rand-1>|<rand-1>`; train_ti.py L85-108)."""
    import torch

    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    own = pipe.tokenizer(target, add_special_tokens=False).input_ids[:count]
    generator = torch.Generator().manual_seed(derive_seed("fmn-ti-init", seed))
    rows = torch.randn((count, table.shape[1]), generator=generator).to(table)
    if own:
        rows[: len(own)] = table[own]
    return rows.float()


def epoch_order(kind: str, seed: int, epoch: int, n: int):
    import torch

    return torch.randperm(
        n, generator=torch.Generator().manual_seed(derive_seed(kind, seed, epoch))
    )


@contextlib.contextmanager
def frozen(*modules):
    """No gradient into the modules' parameters inside; their own flags back on exit."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def invert(pipe, latents, target: str, settings: FmnSettings, seed: int):
    """The placeholders' embeddings after textual inversion (train_ti.py L262-361)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    unet, encoder = pipe.unet, pipe.text_encoder
    device = unet.device
    dtype = torch.promote_types(unet.dtype, torch.float32)
    rows = initial_rows(pipe, target, settings.ti_tokens, seed).to(device, dtype)
    rows.requires_grad_(True)
    optimizer = torch.optim.AdamW([rows], lr=settings.ti_lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=settings.ti_weight_decay)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt = settings.prompt.format("".join(placeholder_names(settings.ti_tokens)))
    n = len(latents)
    latents = latents.to(device, dtype)
    with placeholders(pipe, rows) as tokenizer, frozen(unet, encoder):
        ids = token_ids(tokenizer, [prompt]).to(encoder.device)
        for step in range(settings.ti_iterations):
            epoch, position = divmod(step, n)
            item = int(epoch_order("fmn-ti-epoch", seed, epoch, n)[position])
            generator = torch.Generator().manual_seed(derive_seed("fmn-ti", seed, step))
            latent = latents[item : item + 1]
            if torch.rand(1, generator=generator).item() > 0.5:  # dataset.py L183 h_flip
                latent = latent.flip(-1)
            noise = torch.randn(latent.shape, generator=generator).to(latent)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
            noisy = scheduler.add_noise(latent, noise, t)
            context = encoder(ids)[0]
            prediction = unet(noisy.to(unet.dtype), t.to(device),
                              encoder_hidden_states=context.to(unet.dtype)).sample  # fmt: skip
            target_ = noise
            if scheduler.config.prediction_type == "v_prediction":
                target_ = scheduler.get_velocity(latent, noise, t)
            loss = F.mse_loss(prediction.float(), target_.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if settings.ti_norm is not None:  # clip_ti_decay, after the step (L329-346)
                with torch.no_grad():
                    norm = rows.norm(dim=-1, keepdim=True)
                    pull = min(1.0, 100 * settings.ti_lr)
                    rows.copy_(
                        F.normalize(rows, dim=-1) * (norm + pull * (settings.ti_norm - norm))
                    )
    return rows.detach()


class AttentionRecorder:
    """attn2's processor as train_attn.py L291-319 writes it (explicit softmax scores),
    keeping each call's probabilities at the concept's positions."""

    def __init__(self, positions):
        self.positions = positions  # (tokens,) bool, the same for every image of a batch
        self.kept = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None):  # fmt: skip
        import torch

        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.kept.append(probs[..., self.positions.to(probs.device)].flatten())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def record_attention(unet, recorder) -> int:
    """Every attn2 of `unet` through `recorder` from now on (for the job's life: gradient
    checkpointing recomputes the forward inside backward, so the processors must stay)."""
    modules = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    for module in modules:
        module.set_processor(recorder)
    return len(modules)


class ForgetMeNot(IterativeMethod):
    """FMN: textual inversion, then attention re-steering (one method per job)."""

    name = "fmn"
    Settings = FmnSettings
    section = "fmn"
    optimizer = "AdamW"

    @classmethod
    def references(cls, settings, concept):
        return [ReferenceRequest("instances", (settings.prompt.format(concept["text"]),),
                                 settings.images)]  # fmt: skip

    @classmethod
    def objective(cls, engine, methods):
        return AttentionObjective(engine, methods)

    @classmethod
    def erase(cls, job, methods):
        from ..training import TrainingError

        ((_, method),) = methods.items()
        found = job.references.get("instances")
        if found is None:
            raise TrainingError(f"{method.target}: FMN's images of the target were not given")
        method.rows = method.inverted(job, found.latents) if method.settings.use_ti else None
        return super().erase(job, methods)

    def inverted(self, job, latents):
        """Stage 1, kept beside the checkpoint so a resumed job does not repeat it."""
        import torch
        from safetensors.torch import load_file, save_file

        from ..constants import TRAINER_VERSION

        s = self.settings
        images = hashlib.sha256(latents.float().cpu().numpy().tobytes()).hexdigest()
        key = json.dumps({"seed": self.seed, "target": self.target, "images": images,
                          **{k: v for k, v in s.as_params().items() if k.startswith("ti_")},
                          "prompt": s.prompt, "precision": s.precision,
                          "dtype": str(job.pipe.unet.dtype),
                          "trainer_version": TRAINER_VERSION})  # fmt: skip
        path = Path(job.checkpoint_dir) / "ti.safetensors" if job.checkpoint_dir else None
        if path and path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as stored:
                if (stored.metadata() or {}).get("key") == key:
                    log.info("textual inversion read from %s", path)
                    return load_file(str(path))["rows"].to(job.device)
        rows = invert(job.pipe, latents, self.target, s, self.seed)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"rows": rows.float().cpu().contiguous()}, str(path), {"key": key})
        return rows.to(torch.promote_types(job.pipe.unet.dtype, torch.float32))

    def optimizer_kwargs(self):
        return {"lr": self.settings.lr, "betas": (0.9, 0.999), "eps": 1e-8,
                "weight_decay": self.settings.weight_decay}  # fmt: skip

    def max_grad_norm(self):
        return self.settings.max_grad_norm

    def delta(self, tensors):
        """The tensors the steps changed (the rest are the base's)."""
        import torch

        frozen = self.engine.copies.frozen
        return {n: t for n, t in tensors.items()
                if not torch.equal(t, frozen[n].detach().float().cpu())}  # fmt: skip

    def delta_metadata(self):
        return {"use_ti": self.settings.use_ti, "prompt": self.prompt,
                "positions": int(self.positions.sum())}  # fmt: skip


class AttentionObjective:
    """One FMN step (train_attn.py L536-563) on the target's images."""

    def __init__(self, engine, methods):
        import torch
        from diffusers import DDPMScheduler

        from ..training import TrainingError

        ((self.name, self.method),) = methods.items()
        method, s = self.method, self.method.settings
        self.engine, self.last_step = engine, {}
        found = engine.references.get("instances")
        if found is None:
            raise TrainingError(f"{method.target}: FMN's images of the target were not given")
        self.latents = found.latents.to(engine.device, engine.dtype)
        rows = getattr(method, "rows", None)
        if s.use_ti and rows is None:
            rows = invert(engine.pipe, found.latents, method.target, s, method.seed)
        pipe = engine.pipe
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if s.use_ti:
                snippet = "".join(placeholder_names(s.ti_tokens))
                tokenizer = stack.enter_context(placeholders(pipe, rows.to(engine.device)))
            else:
                snippet, tokenizer = method.target, pipe.tokenizer
            method.prompt = s.prompt.format(snippet)
            ids = token_ids(tokenizer, [method.prompt]).to(pipe.text_encoder.device)
            self.context = pipe.text_encoder(ids)[0].detach()
            method.positions = concept_positions(tokenizer, method.prompt, snippet, s.use_pooler)
        if not method.positions.any():
            raise TrainingError(f"{method.target}: none of its tokens is in {method.prompt!r} "
                                "after truncation (a longer prompt than the text encoder reads)")  # fmt: skip
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.recorder = AttentionRecorder(method.positions)
        if not record_attention(engine.unet, self.recorder):
            raise TrainingError(f"{method.target}: FMN found no attn2 layer in the UNet")

    def items(self, iteration: int, batch_size: int) -> list[int]:
        n = len(self.latents)
        out = []
        for p in range(iteration * batch_size, (iteration + 1) * batch_size):
            epoch, position = divmod(p, n)
            out.append(int(epoch_order("fmn-epoch", self.engine.seed, epoch, n)[position]))
        return out

    def losses(self, iteration: int):
        import torch

        engine, s = self.engine, self.method.settings
        items = self.items(iteration, s.batch_size)
        generator = engine.generator(iteration)
        latents = self.latents[items]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(items),), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        context = self.context.expand(len(items), -1, -1)
        self.recorder.kept.clear()  # (a checkpointed backward appends its recomputation)
        engine.predict(noisy, timesteps.to(engine.device), context, [len(items)])
        self.last_step = {"items": items}
        return {self.name: torch.cat(self.recorder.kept).to(engine.dtype).norm()}
