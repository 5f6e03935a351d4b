"""ESD-x (Gandikota et al., ICCV 2023), the root of the ESD family (CRCE, CRCE-Fixed,
CRCE-Sphere, RealEra): every iteration samples x_t with the model being trained and pulls the
target's prediction to its negatively guided anchor (paper eq. 1). What a family member trains
on at an iteration is its `plan()`; crce.training.plan.PlanObjective batches the plans of a
group and computes the loss (crce.losses).

Randomness protocol (tests/reference_trainer.py repeats it): the objective seeds one generator
per iteration and draws the DDIM index and the x_T noise from it; a method then draws its lists
or neighbours from the same generator, in the order documented on its class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import IterativeMethod, IterativeSettings

# Parameter sets made of Linear layers only: a group shares batched Linear copies.
LINEAR_PARAM_SETS = ("xattn-kv", "xattn-qk", "xattn")


class EsdSettings(IterativeSettings):
    eta: float = Field(1.0, description="negative-guidance strength of the ESD anchor")
    xt_model: Literal["trained", "frozen"] = Field(
        "trained",
        description="model that samples x_t: `trained` (paper and CRCE code) or `frozen` (ESD "
        "diffusers code)",
    )
    start_guidance: float = Field(
        3.0, ge=0, description="classifier-free guidance of the x_t rollout"
    )
    ddim_steps: int = Field(
        50,
        ge=3,
        description="DDIM steps of the x_t rollout: i ~ U{1..ddim_steps-2} (the official "
        "`randint(1, nsteps - 1)`, so at least 3), and predictions on x_t are made at the "
        "official index int(i / ddim_steps * 1000) of the 1000-step schedule",
    )


class Esd(IterativeMethod):
    """ESD-x: the target's anchor term only (M = N = 0). Draws nothing."""

    name = "esd"
    Settings = EsdSettings

    @classmethod
    def group_key(cls, settings):
        """One x_t rollout per iteration serves every family member that shares these."""
        if settings.params not in LINEAR_PARAM_SETS:
            return None
        return ("esd-family", settings.params, settings.ddim_steps, settings.iterations,
                settings.start_guidance, settings.xt_model, settings.precision)  # fmt: skip

    @classmethod
    def objective(cls, engine, methods):
        from ..training.plan import PlanObjective

        return PlanObjective(engine, methods)

    def plan(self, iteration: int, generator):
        return self.esd_only()

    def esd_only(self):
        """The target's anchor term alone: no corefs, no retains."""
        import torch

        from ..training.plan import Plan

        prompts = self.engine.prompts
        empty, none = prompts.target[:0], torch.zeros(0, device=self.engine.device)
        return Plan(True, empty, none, empty, none)
