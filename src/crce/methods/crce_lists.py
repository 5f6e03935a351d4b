"""CRCE and CRCE-Fixed (Xue et al., BMVC 2025, eq. 3): ESD plus M certainty-weighted corefs
pushed to an anchor and N retains held to the frozen model, drawn from the train lists."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..seeds import derive_seed
from ..training import TrainingError
from .esd import Esd, EsdSettings


class TermSettings(EsdSettings):
    """ESD plus coref and retain terms (CRCE, CRCE-Sphere, RealEra)."""

    n_corefs: int = Field(
        5, ge=0, description="M: corefs (sphere methods: coref neighbours) per iteration"
    )
    n_retains: int = Field(
        3, ge=0, description="N: retains (sphere methods: retain neighbours) per iteration"
    )
    coref_anchor: Literal["target", "self"] = Field(
        "target",
        description="anchor of a coref term: `target` (the paper's equation: the target's "
        "anchor) or `self` (the CRCE code: each coref to its own "
        "e*(x_t) - eta (e*(x_t, c') - e*(x_t)))",
    )
    alpha: float = Field(1.0, ge=0, description="weight of the coref terms")
    beta: float = Field(1.0, ge=0, description="weight of the retain terms")


class CrceSettings(TermSettings):
    fixed: bool = Field(
        False, description="one draw of corefs and retains for the whole run (CRCE-Fixed)"
    )


class Lists(Esd):
    """CRCE: M corefs and N retains from the train lists, certainty-weighted, averaged.
    Draws a permutation of the corefs, then of the retains (CRCE-Fixed: once, from its own
    generator, for the whole run)."""

    name = "crce"
    Settings = CrceSettings
    own_keys = frozenset({"n_corefs", "n_retains", "fixed"})

    @classmethod
    def config_problems(cls, settings, *, n_train):
        drawn = {"n_corefs": settings.n_corefs, "n_retains": settings.n_retains}
        return [
            f"{key}={value} draws more items per iteration than a train split has ({n_train})"
            for key, value in drawn.items()
            if value > n_train
        ]

    def __init__(self, settings, *, target, split, seed):
        super().__init__(settings, target=target, split=split, seed=seed)
        s = settings
        self.corefs = list(split.coref_train) if split is not None else []
        self.retains = list(split.retain_train) if split is not None else []
        if len(self.corefs) < s.n_corefs or len(self.retains) < s.n_retains:
            raise TrainingError(
                f"{target!r}: method draws M={s.n_corefs} corefs and N={s.n_retains} retains "
                f"per iteration, but the train split has {len(self.corefs)} and "
                f"{len(self.retains)}"
            )

    def texts(self):
        return [i.text for i in self.corefs + self.retains]

    def prepare(self, engine):
        import torch

        super().prepare(engine)
        prompts, device = engine.prompts, engine.device
        self.coref_bank = prompts.of([i.text for i in self.corefs])
        self.retain_bank = prompts.of([i.text for i in self.retains])
        self.coref_bank_weights = torch.tensor([i.weight for i in self.corefs], device=device)
        self.retain_bank_weights = torch.tensor([i.weight for i in self.retains], device=device)
        fixed = torch.Generator().manual_seed(derive_seed("crce-train", self.seed, -1))
        self.fixed_draw = self._draw(fixed)

    def _draw(self, generator):
        import torch

        s = self.settings
        coref_idx = torch.randperm(len(self.corefs), generator=generator)[: s.n_corefs]
        retain_idx = torch.randperm(len(self.retains), generator=generator)[: s.n_retains]
        return coref_idx.tolist(), retain_idx.tolist()

    def plan(self, iteration, generator):
        from ..training.plan import Plan

        s = self.settings
        coref_idx, retain_idx = self.fixed_draw if s.fixed else self._draw(generator)
        return Plan(
            True,
            self.coref_bank[coref_idx],
            self.coref_bank_weights[coref_idx],
            self.retain_bank[retain_idx],
            self.retain_bank_weights[retain_idx],
            coref_anchor=s.coref_anchor,
            alpha=s.alpha,
            beta=s.beta,
        )
