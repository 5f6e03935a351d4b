"""The erasure loss (paper, eq. 1-3): the one place where the math lives."""

from __future__ import annotations

import torch


def esd_anchor(e_uncond: torch.Tensor, e_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Negatively guided target: e*(x_t,t) - eta * (e*(x_t,c,t) - e*(x_t,t))."""
    return e_uncond - eta * (e_cond - e_uncond)


def per_item_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each batch item (shape [B])."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # fp32, or fp64 kept
    return (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)


def erasure_loss(
    *,
    pred_target: torch.Tensor | None,
    anchor: torch.Tensor,
    pred_corefs: torch.Tensor,
    coref_anchors: torch.Tensor,
    coref_weights: torch.Tensor,
    pred_retains: torch.Tensor,
    frozen_retains: torch.Tensor,
    retain_weights: torch.Tensor,
    alpha: float,
    beta: float,
    reduce: str = "mean",
) -> torch.Tensor:
    """L = L_ESD + alpha/M sum w_c' |e(c') - anchor_c'|^2 + beta/N sum w_c'' |e(c'') - e*(c'')|^2.

    `pred_target` None drops the ESD term (RealEra's neighbour iterations); empty coref or
    retain batches drop their terms (ESD-x is the special case M = N = 0). `reduce="sum"`
    drops the 1/M and 1/N (RealEra's official code sums its neighbour terms).
    """
    loss = anchor.new_zeros((), dtype=torch.promote_types(anchor.dtype, torch.float32))
    if pred_target is not None:
        loss = loss + per_item_mse(pred_target, anchor).sum()
    if len(pred_corefs):
        coref = (coref_weights * per_item_mse(pred_corefs, coref_anchors)).sum()
        loss = loss + alpha * (coref / len(pred_corefs) if reduce == "mean" else coref)
    if len(pred_retains):
        retain = (retain_weights * per_item_mse(pred_retains, frozen_retains)).sum()
        loss = loss + (beta * retain / len(pred_retains) if reduce == "mean" else beta * retain)
    return loss
