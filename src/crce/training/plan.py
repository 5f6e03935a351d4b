"""The ESD family's objective (ESD-x, CRCE, CRCE-Fixed, CRCE-Sphere, RealEra): each iteration
samples x_t with a DDIM rollout conditioned on the target, and every method's `plan()` says
which loss terms it takes on that x_t (paper eq. 1-3; the loss is crce.losses).

Every method of a group draws the same DDIM index and x_T noise at every iteration, so one
batch carries all of them: all frozen predictions of an iteration in one UNet call and all
trainable ones in another, each slice computed with its own method's trained tensors.

Timestep: after i of the ddim_steps DDIM steps, x_t sits at the noise level of the i-th
DDIM timestep; every prediction on it is made at the official code's
`timesteps[int(i / ddim_steps * 1000)]` of the same DDIM scheduler set to 1000 steps (an
index into the descending 1000-step schedule: 1000 - 20 i for SD v1.4 at DDIM 50, one stride
from x_t's 981 - 20 i; srcs/ours_tools.py of the CRCE code), derived from the scheduler, not
from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import erasure_loss, esd_anchor


@dataclass
class Plan:
    """One iteration's loss terms of one method (paper eq. 1-3)."""

    esd_term: bool
    corefs: torch.Tensor  # [M, L, D] conditioning of the coref terms
    coref_weights: torch.Tensor  # [M]
    retains: torch.Tensor  # [N, L, D]
    retain_weights: torch.Tensor  # [N]
    coref_anchor: str = "target"  # target: the target's anchor; self: each coref's own
    reduce: str = "mean"  # how coref and retain terms combine: mean over M/N, or sum
    alpha: float = 1.0  # weight of the coref terms
    beta: float = 1.0  # weight of the retain terms


class PlanObjective:
    """The batched loss of a group of ESD-family methods (crce.methods.esd)."""

    def __init__(self, engine, methods: dict):
        from diffusers import DDIMScheduler

        self.engine = engine
        self.methods = methods
        self.names = list(methods)
        self.shared = engine.shared
        config = engine.pipe.scheduler.config
        self.scheduler = DDIMScheduler.from_config(config)
        self.scheduler.set_timesteps(self.shared.ddim_steps)
        # The schedule every loss prediction indexes into (official: set_timesteps(1000)).
        self.loss_schedule = DDIMScheduler.from_config(config)
        self.loss_schedule.set_timesteps(self.loss_schedule.config.num_train_timesteps)
        self.last_step: dict = {}

    # -- randomness protocol -------------------------------------------------------------
    def draw(self, iteration: int) -> tuple[int, torch.Tensor, dict]:
        """The DDIM index and x_T noise every method shares, then each method's plan."""
        engine = self.engine
        plans, shared = {}, None
        for name, method in self.methods.items():
            # One generator per method, all seeded alike: each method draws what its own
            # run would (grouped == separate), and i and x_T agree across the group.
            generator = engine.generator(iteration)
            ddim_index = int(
                torch.randint(1, self.shared.ddim_steps - 1, (1,), generator=generator)
            )
            noise = torch.randn(engine.latent_shape, generator=generator)
            shared = shared or (ddim_index, noise.to(engine.device, engine.dtype))
            plans[name] = method.plan(iteration, generator)
        return shared[0], shared[1], plans

    # -- model calls ---------------------------------------------------------------------
    @torch.no_grad()
    def sample_xt(self, ddim_index: int, noise: torch.Tensor) -> torch.Tensor:
        """DDIM rollout from x_T for `ddim_index` steps, conditioned on the target (CFG), one
        latent per method (all alike when x_t comes from the frozen model)."""
        s, prompts = self.shared, self.engine.prompts
        groups = 1 if s.xt_model == "frozen" else len(self.names)
        latents = (noise * self.scheduler.init_noise_sigma).expand(groups, -1, -1, -1)
        context = torch.cat([prompts.uncond, prompts.target] * groups)
        slices = None if s.xt_model == "frozen" else [2] * groups
        for timestep in self.scheduler.timesteps[:ddim_index]:
            pairs = self.engine.predict(
                latents.repeat_interleave(2, dim=0), timestep, context, slices
            )
            e_uncond, e_cond = pairs[0::2], pairs[1::2]
            guided = e_uncond + s.start_guidance * (e_cond - e_uncond)
            latents = self.scheduler.step(guided.to(latents.dtype), timestep, latents).prev_sample
        return latents.expand(len(self.names), -1, -1, -1)

    def unet_timestep(self, ddim_index: int) -> torch.Tensor:
        """The UNet timestep of every loss prediction on x_t (module docstring)."""
        schedule = self.loss_schedule.timesteps
        index = int(ddim_index / self.shared.ddim_steps * len(schedule))
        return schedule[index].to(self.engine.device)

    def losses(self, iteration: int) -> dict[str, torch.Tensor]:
        engine = self.engine
        uncond, target = engine.prompts.uncond, engine.prompts.target
        ddim_index, noise, plans = self.draw(iteration)
        xt = self.sample_xt(ddim_index, noise)
        timestep = self.unet_timestep(ddim_index)
        frozen_batches, trainable_batches = [], []
        for method in self.names:
            plan = plans[method]
            self_anchor = plan.coref_anchor == "self" and len(plan.corefs) > 0
            frozen = [uncond, target]
            frozen += [plan.corefs] if self_anchor else []
            frozen_batches.append(torch.cat([*frozen, plan.retains]))
            trainable = [target] if plan.esd_term else []
            trainable_batches.append(torch.cat([*trainable, plan.corefs, plan.retains]))
        frozen_context = torch.cat(frozen_batches)
        frozen_sizes = [len(b) for b in frozen_batches]
        trainable_sizes = [len(b) for b in trainable_batches]
        with torch.no_grad():
            frozen_all = engine.predict(
                each_latent_per_row(xt, frozen_sizes), timestep, frozen_context
            ).to(engine.dtype)
        predictions_all = engine.predict(
            each_latent_per_row(xt, trainable_sizes),
            timestep,
            torch.cat(trainable_batches),
            trainable_sizes,
        )
        frozen_parts = frozen_all.split(frozen_sizes)
        prediction_parts = predictions_all.split(trainable_sizes)
        losses = {}
        for k, method in enumerate(self.names):
            eta, plan = self.methods[method].settings.eta, plans[method]
            frozen, predictions = frozen_parts[k], prediction_parts[k]
            m, n = len(plan.corefs), len(plan.retains)
            e_uncond, e_target = frozen[0:1], frozen[1:2]
            anchor = esd_anchor(e_uncond, e_target, eta)
            if plan.coref_anchor == "self" and m > 0:
                coref_anchors = esd_anchor(e_uncond, frozen[2 : 2 + m], eta)
            else:
                coref_anchors = anchor.expand(m, -1, -1, -1)
            offset = 1 if plan.esd_term else 0
            losses[method] = erasure_loss(
                pred_target=predictions[0:1] if plan.esd_term else None,
                anchor=anchor,
                pred_corefs=predictions[offset : offset + m],
                coref_anchors=coref_anchors,
                coref_weights=plan.coref_weights,
                pred_retains=predictions[offset + m :],
                frozen_retains=frozen[len(frozen) - n :],
                retain_weights=plan.retain_weights,
                alpha=plan.alpha,
                beta=plan.beta,
                reduce=plan.reduce,
            )
        self.last_step = {"ddim_index": ddim_index, "timestep": int(timestep)}
        return losses


def each_latent_per_row(xt: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Method k's x_t repeated once per row of its prompt batch, methods stacked in order."""
    return torch.cat([xt[k : k + 1].expand(n, -1, -1, -1) for k, n in enumerate(sizes)])
