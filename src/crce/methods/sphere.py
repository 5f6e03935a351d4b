"""CRCE-Sphere (the CRCE code's `execute_ball_sampling`, srcs/realera_tools.py): ESD plus
coref and retain neighbours sampled in a sphere around the target's embedding, as RealEra
draws them."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..settings import _Settings
from ..training import TrainingError
from .crce_lists import TermSettings
from .esd import Esd


class SphereSettings(_Settings):
    """Neighbours e + r (v - e)/|v - e| of the stacked [uncond; cond] target embedding e,
    v ~ N(0, I), r ~ U[0, R], kept by cosine band (srcs/realera_tools.py, `embedding_sampling`)."""

    radius: float = Field(
        400.0,
        gt=0,
        description="R of the neighbours `e + r (v - e)/|v - e|`, `r ~ U[0, R]`. The official "
        "400 is fitted to CLIP-L's stacked [uncond; cond] embedding, whose norm is about "
        "sqrt(2*77*768) = 344 if CLIP-L's final LayerNorm outputs have unit-scale entries (an "
        "estimate: no CLIP-L weights here)",
    )
    radius_mode: Literal["absolute", "relative"] = Field(
        "absolute",
        description="`absolute` (the paper and official profiles): R = `radius`; `relative`: "
        "R = `radius` x |e|, for a small text space where 400 would mean something else: the "
        "tiny and toy encoders' |e| is exactly sqrt(2*L*D) = 32, and `radius: 1.2` there "
        "(about 400 / 344) keeps both cosine bands reachable (measured: 35% of draws land in "
        "the coref band, 26% below the retain bound)",
    )
    coref_cos_min: float = Field(0.5, description="coref band, lower cosine bound")
    coref_cos_max: float = Field(0.9, description="coref band, upper cosine bound")
    retain_cos_max: float = Field(0.5, description="retains lie below this cosine")


class SphereMethodSettings(TermSettings):
    sphere: SphereSettings = Field(
        SphereSettings(),
        description="the neighbour sampler (crce-sphere, realera); a method's override merges "
        "key by key",
    )


def sphere_neighbours(stack, n_corefs: int, n_retains: int, sphere: SphereSettings, generator,
                      max_draws: int = 10_000):  # fmt: skip
    """Neighbours of a stacked [uncond; cond] embedding e, as the official code draws them
    (srcs/realera_tools.py): v ~ N(0, I) shaped like e, r ~ U[0, R], n = e + r (v - e)/|v - e|,
    kept as a coref when cos(e, n) (flattened) is in [coref_cos_min, coref_cos_max], as a
    retain when below retain_cos_max, by rejection: the corefs one by one, then the retains. R
    is `radius` (absolute) or `radius * |e|` (relative). Returns [M, 2, L, D] and [N, 2, L, D]."""
    import torch

    e = stack.to(torch.promote_types(stack.dtype, torch.float32))
    limit = sphere.radius * (e.norm().item() if sphere.radius_mode == "relative" else 1.0)
    flat = e.flatten()
    draws = 0

    def draw(accept):
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


class Sphere(Esd):
    """CRCE-Sphere (official `execute_ball_sampling`): M coref and N retain neighbours of the
    target's [uncond; cond] embedding, redrawn every iteration (sphere_neighbours' order); the
    ESD term every iteration; unit weights; terms averaged. At guidance 1 only a neighbour's
    cond half reaches the prediction, so the cond half is its conditioning."""

    name = "sphere"
    Settings = SphereMethodSettings
    own_keys = frozenset({"n_corefs", "n_retains"})
    reduce: ClassVar[str] = "mean"

    def prepare(self, engine) -> None:
        import torch

        super().prepare(engine)
        prompts = engine.prompts
        self.stack = torch.cat([prompts.uncond, prompts.target]).cpu()  # the same every draw

    def neighbours(self, generator):
        s = self.settings
        corefs, retains = sphere_neighbours(
            self.stack, s.n_corefs, s.n_retains, s.sphere, generator
        )
        device = self.engine.device
        return corefs[:, 1].to(device), retains[:, 1].to(device)

    def plan(self, iteration, generator):
        import torch

        from ..training.plan import Plan

        s, device = self.settings, self.engine.device
        corefs, retains = self.neighbours(generator)
        return Plan(
            True,
            corefs,
            torch.ones(len(corefs), device=device),
            retains,
            torch.ones(len(retains), device=device),
            coref_anchor=s.coref_anchor,
            reduce=self.reduce,
            alpha=s.alpha,
            beta=s.beta,
        )
