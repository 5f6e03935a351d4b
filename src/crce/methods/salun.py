"""SalUn, saliency unlearning (Fan et al., ICLR 2024), as its Stable Diffusion code runs it
(OPTML-Group/Unlearn-Saliency at a6e89fd: SD/train-scripts/generate_mask.py, random_label.py,
dataset.py, README).

Two stages in one erase job:
1. the saliency mask (generate_mask.py L8-108): one pass over the forget images, the
   gradient of `-MSE(eps, (1 + g) eps(x_t, c) - g eps(x_t, ""))` (g `mask_guidance` 7.5)
   summed over batches; the mask keeps the top `mask_share` (0.5) of |gradient| over the
   whole UNet;
2. random-label training (random_label.py L66-139): the forget loss
   `MSE(eps(x_f, c_f), sg eps(x_f, c_pseudo))`, c_pseudo another concept's prompt (here the
   target's anchor, as CA's: crce.methods.ca), plus `alpha` x the plain denoising loss on
   remain images; every gradient multiplied by the mask before Adam's step.

The forget images are the target's, drawn by the base model (`reference_images`; the official
objects use Imagenette's real photos of the class); the remain images are the concept's train
retains' (the official: the other Imagenette classes), the closest set in this study. The
delta keeps the UNet's entries inside the mask only (crce.deltas.sparse).

Randomness, each from its own seeded generator: mask batch b draws its timesteps then its
noise; training iteration k (the engine's generator) draws the remain batch's timesteps and
noise (the LDM's `shared_step`), then the forget batch's. The forget images are walked in
order (its data loader does not shuffle), the remain images in a fresh permutation per pass,
restarted with each forget epoch (`iter(remain_dl)` at each epoch).
"""

from __future__ import annotations

import math

from pydantic import Field

from ..seeds import derive_seed
from .base import IterativeMethod, IterativeSettings, ParamSet, ReferenceRequest
from .ca import anchor_for

PROMPT = "an image of a {}"  # dataset.py's class descriptions


class SalunSettings(IterativeSettings):
    params: ParamSet = Field("full", description="trained tensors (official `--train_method full`)")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (official README 1e-5)")
    iterations: int = Field(
        500, ge=1, description="optimiser steps (official: 5 epochs; 5 x 800/8 here)"
    )
    batch_size: int = Field(8, ge=1, description="forget and remain images per step (official 8)")
    alpha: float = Field(
        0.5,
        ge=0,
        description="weight of the remain loss (official README 0.5; its argparse default 0.1)",
    )
    mask_share: float = Field(
        0.5, gt=0, le=1, description="share of the UNet's entries the mask keeps (official 0.5)"
    )
    mask_guidance: float = Field(
        7.5, description="guidance of the mask's prediction (generate_mask.py `c_guidance`)"
    )
    forget_images: int = Field(
        800, ge=1, description="images of the target from the base model (official NSFW: 800)"
    )
    remain_images: int = Field(
        80, ge=1, description="images of each train retain from the base model"
    )
    prompt: str = Field(PROMPT, description="the prompt of a concept's images, with `{}`")
    anchors: str = Field(
        "resources/anchors.tsv",
        description="curated TSV (concept, anchor): the pseudo concept c_pseudo, CA's anchor; "
        "`llm`: the LLM's anchor (rule `anchor`)",
    )


class Salun(IterativeMethod):
    """SalUn: its mask, then random-label training under it (one method per job)."""

    name = "salun"
    Settings = SalunSettings
    section = "salun"

    @classmethod
    def references(cls, settings, concept):
        from ..constants import LLM_ANCHORS as LLM

        forget = ReferenceRequest("forget", (settings.prompt.format(concept["text"]),),
                                  settings.forget_images)  # fmt: skip
        if settings.anchors == LLM:  # the pseudo concept comes with the job's inputs
            chosen = {"from_anchor": "pseudo"}
        else:
            chosen = {"extra": {"pseudo": anchor_for(settings.anchors, concept)}}
        remain = ReferenceRequest("remain", (), settings.remain_images,
                                  from_split="retain_train", template=settings.prompt,
                                  **chosen)  # fmt: skip
        return [forget, remain]

    @classmethod
    def objective(cls, engine, methods):
        return RandomLabelObjective(engine, methods)

    def delta(self, tensors):
        from ..deltas import sparse

        out = {}
        for name, tensor in tensors.items():
            out.update(sparse(name, tensor, self.mask[name]))
        return out

    def delta_metadata(self):
        return {"pseudo": self.pseudo, "mask_share": self.settings.mask_share,
                "masked_entries": self.kept}  # fmt: skip


def saliency_mask(gradients: dict, share: float) -> dict:
    """1 on exactly the top `share` of |gradient| entries over all tensors, 0 elsewhere
    (generate_mask.py L84-107 ranks them all by argsort and keeps the ranks below share x N).
    Ties at the threshold are broken by position in the tensors' order, as a stable sort
    would: a UNet whose gradients are mostly zero still keeps exactly share x N entries."""
    import torch

    flat = torch.cat([g.abs().flatten() for g in gradients.values()])
    keep = int(len(flat) * share)
    chosen = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    if keep > 0:
        threshold = torch.kthvalue(flat, len(flat) - keep + 1).values  # the keep-th largest
        chosen = flat > threshold
        ties = (flat == threshold).nonzero().flatten()
        chosen[ties[: keep - int(chosen.sum())]] = True
    masks, start = {}, 0
    for name, g in gradients.items():
        masks[name] = chosen[start : start + g.numel()].view(g.shape)
        start += g.numel()
    return masks


class RandomLabelObjective:
    def __init__(self, engine, methods):
        import torch
        from diffusers import DDPMScheduler

        from ..modeling import encode_prompts
        from ..training import TrainingError

        ((self.name, self.method),) = methods.items()
        method, s = self.method, self.method.settings
        self.engine, self.last_step = engine, {}
        missing = [n for n in ("forget", "remain") if n not in engine.references]
        if missing:
            raise TrainingError(f"{method.target}: SalUn's {' and '.join(missing)} images "
                                "were not given to the job")  # fmt: skip
        forget, remain = engine.references["forget"], engine.references["remain"]
        method.pseudo = remain.extra["pseudo"]
        self.forget = forget.latents.to(engine.device, engine.dtype)
        self.remain = remain.latents.to(engine.device, engine.dtype)
        self.forget_prompts, self.remain_prompts = forget.prompts, remain.prompts
        pseudo = s.prompt.format(method.pseudo)
        unique = list(dict.fromkeys([*forget.prompts, pseudo, *remain.prompts, ""]))
        self.row = {p: k for k, p in enumerate(unique)}
        self.pseudo_prompt = pseudo
        self.embeddings = encode_prompts(engine.pipe, unique)
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        self.forget_batches = math.ceil(len(self.forget) / s.batch_size)
        self.remain_batches = math.ceil(len(self.remain) / s.batch_size)
        self.orders: dict[tuple, torch.Tensor] = {}
        self.trained = engine.trained[self.name]
        method.mask = self.compute_mask()
        method.kept = int(sum(m.sum() for m in method.mask.values()))
        for name, tensor in self.trained.items():  # the official `p.grad *= mask`
            tensor.register_hook(lambda grad, m=method.mask[name]: grad * m.to(grad.dtype))

    def context(self, prompts):
        return self.embeddings[[self.row[p] for p in prompts]]

    def noised(self, latents, generator):
        """LDM's q_sample at t ~ U{0..999}: timesteps first, then the noise."""
        import torch

        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(latents),), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return self.scheduler.add_noise(latents, noise, t), noise, t.to(latents.device)

    def compute_mask(self) -> dict:
        import torch
        import torch.nn.functional as F

        engine, s = self.engine, self.method.settings
        b, g = s.batch_size, s.mask_guidance
        for start in range(0, len(self.forget), b):
            generator = torch.Generator().manual_seed(
                derive_seed("salun-mask", engine.seed, start // b)
            )
            latents = self.forget[start : start + b]
            noisy, noise, t = self.noised(latents, generator)
            n = len(latents)
            prompts = self.forget_prompts[start : start + b]
            context = torch.cat([self.context(prompts), self.context([""] * n)])
            out = engine.predict(noisy.repeat(2, 1, 1, 1), t.repeat(2), context, [2 * n])
            forget_out, null_out = out[:n], out[n:]
            preds = (1 + g) * forget_out - g * null_out
            (-F.mse_loss(noise.to(engine.dtype), preds.to(engine.dtype))).backward()
        gradients = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                     for n, p in self.trained.items()}  # fmt: skip
        for p in self.trained.values():
            p.grad = None
        return saliency_mask(gradients, s.mask_share)

    def remain_items(self, iteration: int) -> list[int]:
        """The remain batch of `iteration`: a fresh shuffle per pass, restarted each forget
        epoch."""
        import torch

        b = self.method.settings.batch_size
        epoch, step = divmod(iteration, self.forget_batches)
        cycle, batch = divmod(step, self.remain_batches)
        key = (epoch, cycle)
        if key not in self.orders:
            seed = derive_seed("salun-remain", self.engine.seed, epoch, cycle)
            self.orders[key] = torch.randperm(len(self.remain),
                                              generator=torch.Generator().manual_seed(seed))  # fmt: skip
        return self.orders[key][batch * b : (batch + 1) * b].tolist()

    def losses(self, iteration: int):
        import torch
        import torch.nn.functional as F

        engine, s = self.engine, self.method.settings
        b = s.batch_size
        generator = engine.generator(iteration)
        remain_items = self.remain_items(iteration)
        start = (iteration % self.forget_batches) * b
        forget_items = list(range(start, min(start + b, len(self.forget))))
        remain_noisy, remain_noise, remain_t = self.noised(self.remain[remain_items], generator)
        forget_noisy, _, forget_t = self.noised(self.forget[forget_items], generator)
        nf, nr = len(forget_items), len(remain_items)
        context = torch.cat([self.context([self.forget_prompts[i] for i in forget_items]),
                             self.context([self.remain_prompts[i] for i in remain_items])])  # fmt: skip
        out = engine.predict(torch.cat([forget_noisy, remain_noisy]),
                             torch.cat([forget_t, remain_t]), context, [nf + nr])  # fmt: skip
        with torch.no_grad():
            pseudo = engine.predict(forget_noisy, forget_t,
                                    self.context([self.pseudo_prompt] * nf), [nf])  # fmt: skip
        dtype = engine.dtype  # fp32 under bf16 autocast (fp64 in exactness tests)
        forget_loss = F.mse_loss(out[:nf].to(dtype), pseudo.to(dtype))
        remain_loss = F.mse_loss(out[nf:].to(dtype), remain_noise.to(dtype))
        self.last_step = {"forget": forget_items[0], "remain": remain_items[:1]}
        return {self.name: forget_loss + s.alpha * remain_loss}
