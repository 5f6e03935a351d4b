"""RECE (Gong et al., ECCV 2024, "Reliable and Efficient Concept Erasure of Text-to-Image
Diffusion Models"): UCE, then rounds that derive in closed form the embedding that still
regenerates the concept from the edited model, and erase that embedding too.

Follows the official code, CharlesGong12/RECE at 403a67fd86dce6c124b88798340e001e625b28c9:
train.py (the loop, `for epoch in range(epochs)`), utils/embedding_calculation/
close_form_emb.py (`close_form_emb_regzero`: the derived embedding, crce.closed_form.
regenerating_embedding) and erase_methods/uce.py (`edit_model_adversarial`: the same ridge
edit as UCE over all the derived embedding's token rows, towards the guide's token rows,
anchored at the current weights, preserving the blank prompt's tokens). README's fidelity
table lists each default, paper and code.
"""

from __future__ import annotations

import logging

from pydantic import Field

from .uce import Uce, UceSettings, edited_names

log = logging.getLogger(__name__)


class ReceSettings(UceSettings):
    strategy: str = "rece"
    rounds: int = Field(
        1,
        ge=0,
        description="derive-and-erase rounds after UCE (official: nudity 3, unsafe 2, "
        "artists and objects 1)",
    )
    regular_scale: float = Field(
        0.1,
        gt=0,
        description="ridge on the derived embedding (official: 0.1 for nudity, "
        "unsafe and easy objects; 1e-3 for artists and hard objects)",
    )
    round_lamb: float = Field(
        0.1, ge=0, description="each round's pull towards the current weights (`lamb`, 0.1)"
    )
    round_preserve_scale: float = Field(
        0.1, ge=0, description="each round's weight on the blank prompt's tokens (0.1)"
    )
    round_erase_scale: float = Field(1.0, ge=0, description="each round's erase scale (1)")
    retain_text: str = Field(
        " ", description="the prompt whose tokens each round preserves (official: a blank ' ')"
    )


class Rece(Uce):
    """RECE: UCE (this pipeline's `uce` solve as its starting point), then `rounds` of
    derive-and-erase over every attn2 to_k and to_v."""

    name = "rece"
    Settings = ReceSettings
    own_keys = frozenset({"lists", "rounds", "regular_scale", "round_lamb",
                          "round_preserve_scale", "round_erase_scale", "retain_text"})  # fmt: skip

    def solve(self, pipe) -> dict:
        import torch

        from ..closed_form import regenerating_embedding, ridge_edit
        from ..modeling import encode_prompts

        s = self.settings
        current = {name: w.double() for name, w in super().solve(pipe).items()}  # UCE first
        parameters = dict(pipe.unet.named_parameters())
        names = edited_names(pipe.unet)
        original = {n: parameters[n].detach().double() for n in names}
        rows = lambda text: encode_prompts(pipe, [text])[0].double()  # noqa: E731  [L, D]
        concept, guide, retain = rows(self.target), rows(s.guide), rows(s.retain_text)
        ones = torch.ones(len(concept), dtype=torch.float64, device=concept.device)
        keep = torch.full((len(retain),), s.round_preserve_scale, dtype=torch.float64,
                          device=concept.device)  # fmt: skip
        with torch.no_grad():
            for k in range(s.rounds):
                derived = regenerating_embedding(
                    [current[n] for n in names], [original[n] for n in names], concept,
                    s.regular_scale,
                )  # fmt: skip
                for name in names:
                    w = current[name]
                    current[name] = ridge_edit(w, derived, guide @ w.T, s.round_erase_scale * ones,
                                               retain, keep, s.round_lamb)  # fmt: skip
                log.info("RECE round %d: |c'| %.4g (the concept's %.4g)", k + 1,
                         derived.norm(), concept.norm())  # fmt: skip
        return {name: w.float().cpu().contiguous() for name, w in current.items()}
