"""Stub methods written against the method contract (crce.methods), as a lab would write its
own: none is in the package, and none needs an edit of the engine, the sampler or the rules.

- `DenoiseReference`: an iterative method with its own objective, a denoising loss on a set of
  reference images drawn by the workflow (what CA, SalUn and MACE train on), a trainable set of its own choosing (the
  mid block's attention, beyond attn2 K/V) and a new token embedding trained beside the UNet
  (what FMN's textual inversion adds), checkpointed by the engine like the rest.
- `DampedValues`: a closed-form method with a per-prompt sampling hook that scales every
  cross-attention value for the prompts that name the target (what SPM's transport does).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pydantic import Field

from crce.methods import (
    ClosedFormMethod,
    IterativeMethod,
    IterativeSettings,
    MethodSettings,
    ReferenceRequest,
    Sampling,
)


class DenoiseSettings(IterativeSettings):
    token_lr: float = Field(1e-2, gt=0, description="learning rate of the new token embedding")


class DenoiseObjective:
    """MSE(eps_theta(x_t, c_target + token, t), eps) on the noised reference latents."""

    def __init__(self, engine, methods):
        from diffusers import DDPMScheduler

        self.engine, self.methods = engine, methods
        self.scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        self.last_step = {}

    def losses(self, iteration):
        engine = self.engine
        generator = engine.generator(iteration)  # the engine's per-iteration randomness
        latents = engine.references["anchor"].latents.to(engine.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, 1000, (1,), generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, t)
        losses = {}
        for name, method in self.methods.items():
            context = engine.prompts.target + method.token  # the new embedding conditions it
            context = context.expand(len(latents), -1, -1)
            prediction = engine.predict(noisy, t.to(engine.device), context, [len(latents)])
            losses[name] = F.mse_loss(prediction.float(), noise.float())
        self.last_step = {"timestep": int(t)}
        return losses


class DenoiseReference(IterativeMethod):
    """A denoising loss on reference images, its own trainable set and a new embedding."""

    Settings = DenoiseSettings

    def trainable(self, unet):
        return [n for n, _ in unet.named_parameters() if n.startswith("mid_block.attentions")]

    def extra_parameters(self, engine):
        width = engine.prompts.target.shape[-1]
        self.token = torch.nn.Parameter(torch.zeros(1, 1, width, device=engine.device))
        return {"token": self.token}

    @classmethod
    def references(cls, settings, concept):
        """Two images of the target from the base model (the `reference_images` rule)."""
        prompt = f"a photo of {concept['text']}"
        return [ReferenceRequest("anchor", (prompt,), images_per_prompt=2, steps=3)]

    @classmethod
    def objective(cls, engine, methods):
        return DenoiseObjective(engine, methods)


class DampedSettings(MethodSettings):
    damping: float = Field(0.5, ge=0, le=1, description="value scale for prompts naming the target")


class DampedValues(ClosedFormMethod):
    """No weight change (a zero-scaled copy of one tensor); at sampling time every attn2 value
    is scaled by `damping` for the prompts that contain the target's text."""

    Settings = DampedSettings

    def delta_metadata(self):
        return {"target": self.target}

    def solve(self, pipe):
        name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_v.weight"))
        return {name: dict(pipe.unet.named_parameters())[name].detach().clone()}

    @classmethod
    def sampling(cls, settings, delta, concept, split=None):
        from crce.deltas import delta_record

        return DampedSampling(settings.damping, delta_record(delta)["target"])


class DampedSampling(Sampling):
    """Around each batch: every attn2 value scaled by `damping` for the prompts naming
    `target` (the cond half of classifier-free guidance's [uncond; cond] batch)."""

    def __init__(self, damping: float, target: str):
        self.damping, self.target = damping, target

    @contextlib.contextmanager
    def batch(self, pipe, prompts):
        scale = torch.tensor([self.damping if self.target in p else 1.0 for p in prompts])

        def damp(module, args, output):
            factors = torch.cat([torch.ones_like(scale), scale]).to(output)
            return output * factors.view(-1, *[1] * (output.dim() - 1))

        handles = [m.register_forward_hook(damp) for n, m in pipe.unet.named_modules()
                   if n.endswith("attn2.to_v")]  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
