"""Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form method.

Follows the official `trainscripts/uce_sd_erase.py` (rohitgandikota/unified-concept-editing,
commit ea9644fd83ed929c47ae26aef2681e2b2f24bedb; the core is the same at 81f49507 and
4502388c): one token per concept (its last word's, index attention_mask.sum() - 2 of the
padded tokenization; the empty guide's index 0 is the start token), every attn2 to_k and
to_v edited by one ridge least-squares solve with the ORIGINAL weights as targets
(crce.closed_form.ridge_edit). Its older `train_erase.py` (several tokens per concept, ''
always preserved, lamb 0.5 hard-coded) is not what this computes: README. The solve runs in
fp64 (the official code inverts in fp32) and is written in fp32.
"""

from __future__ import annotations

import logging

from pydantic import Field

from .base import ClosedFormMethod, MethodSettings

log = logging.getLogger(__name__)


class UceSettings(MethodSettings):
    """W = (lamb W0 + sum_e es_e v*_e c_e^T + sum_p ps_p W0 c_p c_p^T)
    (lamb I + sum_e es_e c_e c_e^T + sum_p ps_p c_p c_p^T)^-1 for every attn2 to_k / to_v
    weight W, c = a concept's last-word token embedding, v*_e = W0 c_guide."""

    strategy: str = "uce"
    lists: bool = Field(
        False,
        description="`false` erases the target alone and preserves nothing (UCE's own "
        "default); `true` (uce-cr) erases the target and its train corefs and preserves its "
        "train retains, each scaled by its certainty weight",
    )
    erase_scale: float = Field(1.0, ge=0, description="scale of the erased concepts' terms")
    preserve_scale: float = Field(1.0, ge=0, description="scale of the preserved concepts' terms")
    lamb: float = Field(
        0.5, ge=0, description="ridge weight pulling every edited matrix towards the original"
    )
    guide: str = Field(
        "",
        description='the anchor an erased concept\'s keys and values move to ("": the '
        "start token, UCE's default for objects)",
    )
    certainty_weights: bool = Field(
        True, description="lists only: scale each coref and retain by its certainty weight"
    )


def edited_names(unet) -> list[str]:
    """The weights UCE edits: every cross-attention to_k and to_v (32 in SD v1.4)."""
    from ..modeling import PARAM_SETS

    select = PARAM_SETS["xattn-kv"]
    return [n for n, _ in unet.named_parameters() if select(n) and n.endswith(".weight")]


def last_token_embeddings(pipe, texts: list[str]):
    """[n, D]: each text's last word token in the text encoder's last hidden state."""
    import torch

    from ..modeling import tokenize

    tokens = tokenize(pipe, texts)
    with torch.no_grad():
        states = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]
    index = (tokens.attention_mask.sum(dim=1) - 2).clamp_min(0).to(states.device)
    return states[torch.arange(len(texts), device=states.device), index]


class Uce(ClosedFormMethod):
    """UCE (`lists: false`) and UCE-CR (`lists: true`, this pipeline's lists in the solve)."""

    name = "uce"
    Settings = UceSettings
    section = "uce"
    own_keys = frozenset({"lists"})

    def concepts(self) -> tuple[list, list, list, list]:
        """Erased and preserved texts with their scales."""
        s, split = self.settings, self.split
        erase, erase_scales = [self.target], [s.erase_scale]
        preserve, preserve_scales = [], []
        if s.lists:
            weight = (lambda item: item.weight) if s.certainty_weights else (lambda item: 1.0)
            erase += [i.text for i in split.coref_train]
            erase_scales += [s.erase_scale * weight(i) for i in split.coref_train]
            preserve = [i.text for i in split.retain_train]
            preserve_scales = [s.preserve_scale * weight(i) for i in split.retain_train]
        return erase, erase_scales, preserve, preserve_scales

    def solve(self, pipe) -> dict:
        """The edited to_k / to_v weights (UNet names), fp32 on the CPU."""
        import torch

        from ..closed_form import ridge_edit

        s = self.settings
        erase, erase_scales, preserve, preserve_scales = self.concepts()
        embeddings = last_token_embeddings(pipe, [s.guide, *erase, *preserve]).double()
        guide, c_erase = embeddings[:1], embeddings[1 : 1 + len(erase)]
        c_preserve = embeddings[1 + len(erase) :]
        to_tensor = lambda values: torch.tensor(values, dtype=torch.float64, device=guide.device)  # noqa: E731
        parameters = dict(pipe.unet.named_parameters())
        edited = {}
        with torch.no_grad():
            for name in edited_names(pipe.unet):
                w_old = parameters[name].detach().double()
                targets = (guide @ w_old.T).expand(len(erase), -1)  # v* = W0 c_guide per row
                w_new = ridge_edit(
                    w_old,
                    c_erase,
                    targets,
                    to_tensor(erase_scales),
                    c_preserve,
                    to_tensor(preserve_scales),
                    s.lamb,
                )
                edited[name] = w_new.float().cpu().contiguous()
        log.info(
            "UCE: %d weights; erased %d concept(s) towards %r, preserved %d",
            len(edited),
            len(erase),
            s.guide,
            len(preserve),
        )
        return edited
