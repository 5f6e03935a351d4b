"""What an iterative erasure method trains on, one small object per strategy.

A strategy turns an iteration into a `Plan`: whether the ESD term is in the loss, the
conditioning of the coref and retain terms, their weights and anchors, and how the terms
reduce (mean or sum). The engine (`crce.erase`) makes every model call and owns the
optimiser; adding a strategy touches this module only.

Randomness protocol (the reference in tests/ repeats it): the engine seeds one generator per
iteration and draws the DDIM index and the x_T noise from it; the strategy then draws its
lists or neighbours from the same generator, in the order documented on each class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .settings import SphereSettings, TrainSettings, derive_seed


class TrainingError(RuntimeError):
    pass


@dataclass
class Plan:
    """One iteration's loss terms (paper eq. 1-3)."""

    esd_term: bool
    corefs: torch.Tensor  # [M, L, D] conditioning of the coref terms
    coref_weights: torch.Tensor  # [M]
    retains: torch.Tensor  # [N, L, D]
    retain_weights: torch.Tensor  # [N]
    coref_anchor: str = "target"  # target: the target's anchor; self: each coref's own
    reduce: str = "mean"  # how coref and retain terms combine: mean over M/N, or sum


class Prompts:
    """Text conditioning of a run, encoded once: the empty prompt, the target, and every list
    item any strategy of the run draws from."""

    def __init__(self, encode, target: str, texts: list[str]):
        unique = list(dict.fromkeys(texts))
        embeddings = encode(["", target, *unique])
        self.uncond, self.target = embeddings[0:1], embeddings[1:2]
        self._row = {text: 2 + k for k, text in enumerate(unique)}
        self._embeddings = embeddings

    def of(self, texts: list[str]) -> torch.Tensor:
        return self._embeddings[[self._row[t] for t in texts]]


class Strategy:
    """An iterative strategy; `texts` lists what it needs encoded before the run."""

    def __init__(self, settings: TrainSettings, target: str, split, seed: int):
        self.settings = settings
        self.seed = seed

    def texts(self) -> list[str]:
        return []

    def prepare(self, prompts: Prompts, device: torch.device) -> None:
        self.prompts = prompts
        self.device = device

    def plan(self, iteration: int, generator: torch.Generator) -> Plan:
        raise NotImplementedError

    def _esd_only(self) -> Plan:
        """The target's anchor term alone: no corefs, no retains."""
        empty, none = self.prompts.target[:0], torch.zeros(0, device=self.device)
        return Plan(True, empty, none, empty, none)


class Esd(Strategy):
    """ESD-x: the target's anchor term only (M = N = 0). Draws nothing."""

    def plan(self, iteration, generator):
        return self._esd_only()


class Lists(Strategy):
    """CRCE: M corefs and N retains from the train lists, certainty-weighted, averaged.
    Draws a permutation of the corefs, then of the retains (CRCE-Fixed: once, from its own
    generator, for the whole run)."""

    def __init__(self, settings, target, split, seed):
        super().__init__(settings, target, split, seed)
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

    def prepare(self, prompts, device):
        super().prepare(prompts, device)
        self.coref_bank = prompts.of([i.text for i in self.corefs])
        self.retain_bank = prompts.of([i.text for i in self.retains])
        self.coref_bank_weights = torch.tensor([i.weight for i in self.corefs], device=device)
        self.retain_bank_weights = torch.tensor([i.weight for i in self.retains], device=device)
        fixed = torch.Generator().manual_seed(derive_seed("crce-train", self.seed, -1))
        self.fixed_draw = self._draw(fixed)

    def _draw(self, generator):
        s = self.settings
        coref_idx = torch.randperm(len(self.corefs), generator=generator)[: s.n_corefs]
        retain_idx = torch.randperm(len(self.retains), generator=generator)[: s.n_retains]
        return coref_idx.tolist(), retain_idx.tolist()

    def plan(self, iteration, generator):
        coref_idx, retain_idx = self.fixed_draw if self.settings.fixed else self._draw(generator)
        return Plan(
            True,
            self.coref_bank[coref_idx],
            self.coref_bank_weights[coref_idx],
            self.retain_bank[retain_idx],
            self.retain_bank_weights[retain_idx],
            coref_anchor=self.settings.coref_anchor,
        )


def sphere_neighbours(
    stack: torch.Tensor,
    n_corefs: int,
    n_retains: int,
    sphere: SphereSettings,
    generator: torch.Generator,
    max_draws: int = 10_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of a stacked [uncond; cond] embedding e, as the official code draws them
    (FACTS 2.7): v ~ N(0, I) shaped like e, r ~ U[0, R], n = e + r (v - e)/|v - e|, kept as
    a coref when cos(e, n) (flattened) is in [coref_cos_min, coref_cos_max], as a retain when
    below retain_cos_max, by rejection: the corefs one by one, then the retains. R is
    `radius` (absolute) or `radius * |e|` (relative). Returns [M, 2, L, D] and [N, 2, L, D]."""
    e = stack.to(torch.promote_types(stack.dtype, torch.float32))
    limit = sphere.radius * (e.norm().item() if sphere.radius_mode == "relative" else 1.0)
    flat = e.flatten()
    draws = 0

    def draw(accept) -> torch.Tensor:
        nonlocal draws
        while draws < max_draws:
            draws += 1
            v = torch.randn(e.shape, generator=generator)
            r = torch.rand(1, generator=generator).item() * limit
            offset = v - e
            neighbour = e + r * (offset / offset.norm())
            cos = torch.nn.functional.cosine_similarity(flat, neighbour.flatten(), dim=0)
            if accept(cos.item()):
                return neighbour
        raise TrainingError(
            f"sphere sampling found no neighbour in its cosine band within {max_draws} draws "
            f"(radius {sphere.radius}, {sphere.radius_mode}); widen train.sphere.radius or the "
            "bands (an absolute radius fits CLIP-L only: use radius_mode relative elsewhere)"
        )

    corefs = [
        draw(lambda c: sphere.coref_cos_min <= c <= sphere.coref_cos_max) for _ in range(n_corefs)
    ]
    retains = [draw(lambda c: c < sphere.retain_cos_max) for _ in range(n_retains)]
    empty = e.new_zeros((0, *e.shape))
    stacked = lambda items: torch.stack(items).to(stack.dtype) if items else empty  # noqa: E731
    return stacked(corefs), stacked(retains)


class Sphere(Strategy):
    """CRCE-Sphere (official `execute_ball_sampling`): M coref and N retain neighbours of the
    target's [uncond; cond] embedding, redrawn every iteration (sphere_neighbours' order); the
    ESD term every iteration; unit weights; terms averaged. At guidance 1 only a neighbour's
    cond half reaches the prediction, so the cond half is its conditioning."""

    reduce: ClassVar[str] = "mean"

    def prepare(self, prompts: Prompts, device: torch.device) -> None:
        super().prepare(prompts, device)
        self.stack = torch.cat([prompts.uncond, prompts.target]).cpu()  # the same every draw

    def neighbours(self, generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        corefs, retains = sphere_neighbours(
            self.stack, s.n_corefs, s.n_retains, s.sphere, generator
        )
        return corefs[:, 1].to(self.device), retains[:, 1].to(self.device)

    def plan(self, iteration, generator):
        corefs, retains = self.neighbours(generator)
        return Plan(
            True,
            corefs,
            torch.ones(len(corefs), device=self.device),
            retains,
            torch.ones(len(retains), device=self.device),
            coref_anchor=self.settings.coref_anchor,
            reduce=self.reduce,
        )


class RealEra(Sphere):
    """RealEra as the CRCE authors re-implemented it on ESD-x (official `execute_realera_
    sampling`): odd iterations take the ESD term alone (`if i % 2:`), even ones the neighbour
    terms alone, summed over the neighbours (no 1/M, 1/N)."""

    reduce = "sum"

    def plan(self, iteration, generator):
        if iteration % 2:
            return self._esd_only()
        plan = super().plan(iteration, generator)
        plan.esd_term = False
        return plan


STRATEGIES: dict[str, type[Strategy]] = {
    "esd": Esd,
    "crce": Lists,
    "sphere": Sphere,
    "realera": RealEra,
}
