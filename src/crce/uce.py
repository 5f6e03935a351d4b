"""Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form strategy.

Follows the official `trainscripts/uce_sd_erase.py` (rohitgandikota/unified-concept-editing,
commit ea9644fd83ed929c47ae26aef2681e2b2f24bedb; the core is the same at 81f49507 and
4502388c): one token per concept (its last word's, index attention_mask.sum() - 2 of the
padded tokenization; the empty guide's index 0 is the start token), every attn2 to_k and
to_v edited by one ridge least-squares solve with the ORIGINAL weights as targets
(crce.settings.UceSettings has the formula). Its older `train_erase.py` (several tokens per
concept, '' always preserved, lamb 0.5 hard-coded) is not what this computes: README.
The solve runs in fp64 (the official code inverts in fp32) and is written in fp32.
"""

from __future__ import annotations

import logging

import torch

from .modeling import PARAM_SETS, tokenize
from .settings import UceSettings

log = logging.getLogger(__name__)


def edited_names(unet) -> list[str]:
    """The weights UCE edits: every cross-attention to_k and to_v (32 in SD v1.4)."""
    select = PARAM_SETS["xattn-kv"]
    return [n for n, _ in unet.named_parameters() if select(n) and n.endswith(".weight")]


@torch.no_grad()
def last_token_embeddings(pipe, texts: list[str]) -> torch.Tensor:
    """[n, D]: each text's last word token in the text encoder's last hidden state."""
    tokens = tokenize(pipe, texts)
    states = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]
    index = (tokens.attention_mask.sum(dim=1) - 2).clamp_min(0).to(states.device)
    return states[torch.arange(len(texts), device=states.device), index]


def solve(
    w_old: torch.Tensor,
    erase: torch.Tensor,
    targets: torch.Tensor,
    erase_weights: torch.Tensor,
    preserve: torch.Tensor,
    preserve_weights: torch.Tensor,
    lamb: float,
) -> torch.Tensor:
    """argmin_W lamb |W - W0|^2 + sum_e w_e |W c_e - v*_e|^2 + sum_p w_p |W c_p - W0 c_p|^2,
    i.e. W B = A with B = lamb I + C_e^T W_e C_e + C_p^T W_p C_p and
    A = lamb W0 + V*^T W_e C_e + W0 C_p^T W_p C_p (rows of C are concepts)."""
    eye = torch.eye(w_old.shape[1], dtype=w_old.dtype, device=w_old.device)
    weighted_erase = erase * erase_weights[:, None]
    weighted_preserve = preserve * preserve_weights[:, None]
    b = lamb * eye + erase.T @ weighted_erase + preserve.T @ weighted_preserve
    a = lamb * w_old + targets.T @ weighted_erase + w_old @ (preserve.T @ weighted_preserve)
    return torch.linalg.solve(b, a.T).T  # B is symmetric: W = A B^-1


def concepts(settings: UceSettings, target: str, split) -> tuple[list, list, list, list]:
    """Erased and preserved texts with their scales."""
    erase, erase_scales = [target], [settings.erase_scale]
    preserve, preserve_scales = [], []
    if settings.lists:
        weight = (lambda item: item.weight) if settings.certainty_weights else (lambda item: 1.0)
        erase += [i.text for i in split.coref_train]
        erase_scales += [settings.erase_scale * weight(i) for i in split.coref_train]
        preserve = [i.text for i in split.retain_train]
        preserve_scales = [settings.preserve_scale * weight(i) for i in split.retain_train]
    return erase, erase_scales, preserve, preserve_scales


def edit(pipe, settings: UceSettings, target: str, split) -> dict[str, torch.Tensor]:
    """The edited to_k / to_v weights (UNet names), fp32 on the CPU."""
    erase, erase_scales, preserve, preserve_scales = concepts(settings, target, split)
    embeddings = last_token_embeddings(pipe, [settings.guide, *erase, *preserve]).double()
    guide, c_erase = embeddings[:1], embeddings[1 : 1 + len(erase)]
    c_preserve = embeddings[1 + len(erase) :]
    to_tensor = lambda values: torch.tensor(values, dtype=torch.float64, device=guide.device)  # noqa: E731
    parameters = dict(pipe.unet.named_parameters())
    edited = {}
    for name in edited_names(pipe.unet):
        w_old = parameters[name].detach().double()
        targets = (guide @ w_old.T).expand(len(erase), -1)  # v* = W0 c_guide, per erased row
        w_new = solve(
            w_old,
            c_erase,
            targets,
            to_tensor(erase_scales),
            c_preserve,
            to_tensor(preserve_scales),
            settings.lamb,
        )
        edited[name] = w_new.float().cpu().contiguous()
    log.info(
        "UCE: %d weights; erased %d concept(s) towards %r, preserved %d",
        len(edited),
        len(erase),
        settings.guide,
        len(preserve),
    )
    return edited
