"""Closed-form edits of linear maps (UCE's ridge least squares, Gandikota et al., WACV 2024):
the one place their linear algebra lives."""

from __future__ import annotations

import torch


def ridge_edit(
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
    weighted_erase = erase * erase_weights[:, None]
    preserve_gram = preserve.T @ (preserve * preserve_weights[:, None])
    return gram_edit(
        w_old,
        lamb,
        cross=targets.T @ weighted_erase + w_old @ preserve_gram,
        gram=erase.T @ weighted_erase + preserve_gram,
    )


def gram_edit(w_old: torch.Tensor, lamb: float, cross: torch.Tensor, gram: torch.Tensor):
    """argmin_W lamb |W - W0|^2 + sum_i |W c_i - v_i|^2 from its sums alone: with
    cross = sum_i v_i c_i^T and gram = sum_i c_i c_i^T (symmetric), W = (lamb W0 + cross)
    (lamb I + gram)^-1. MACE's refinement and fusion keep only these sums (its caches)."""
    eye = torch.eye(w_old.shape[1], dtype=w_old.dtype, device=w_old.device)
    a = lamb * w_old + cross
    return torch.linalg.solve(lamb * eye + gram, a.T).T  # the gram is symmetric: W = A B^-1


def regenerating_embedding(
    edited: list[torch.Tensor], original: list[torch.Tensor], c0: torch.Tensor, lamb: float
) -> torch.Tensor:
    """RECE's derived embedding (Gong et al., ECCV 2024; the official
    utils/embedding_calculation/close_form_emb.py, `close_form_emb_regzero`): the embedding c'
    whose keys and values under the edited maps W'_l reproduce what the original maps W_l made
    of the concept's embedding c0, with a ridge on c':

        c' = argmin_c sum_l |W'_l c - W_l c0|^2 + lamb |c|^2
           = (lamb I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c0,

    row by row for c0 of shape [tokens, D]."""
    eye = torch.eye(c0.shape[1], dtype=c0.dtype, device=c0.device)
    gram = lamb * eye + sum(w.T @ w for w in edited)
    cross = sum(w_new.T @ w_old for w_new, w_old in zip(edited, original, strict=True))
    return torch.linalg.solve(gram, cross @ c0.T).T


def null_space_projector(retain: torch.Tensor, threshold: float) -> torch.Tensor:
    """SPEED's P (Li et al., 2025; the official train_erase_null.py): the projector onto the
    eigenvectors of the retain embeddings' mean covariance C0 = K0 K0^T / N whose eigenvalues
    are below `threshold` (the directions the retain set does not occupy). `retain`: [N, D]."""
    covariance = retain.T @ retain / len(retain)
    values, vectors = torch.linalg.eigh(covariance)
    kept = vectors[:, values < threshold]
    return kept @ kept.T


def null_space_edit(
    w: torch.Tensor,
    targets: torch.Tensor,
    anchors: torch.Tensor,
    projector: torch.Tensor,
    invariant: torch.Tensor,
    retain_scale: float,
    lamb: float,
) -> torch.Tensor:
    """SPEED's update (its train_erase_null.py, the solution with the invariance constraint):
    with A = mean_e c_e c_e^T, B = mean_e c*_e c_e^T over the erased embeddings c_e and their
    anchors c*_e, P the null-space projector, K2 the invariant embeddings (columns of
    `invariant`, [D, k]) and M = (A P + retain_scale I)^-1,

        Delta = W (B - A) P [I - M K2 (K2^T P M K2 + lamb I)^-1 K2^T P] M.

    Delta = Delta P (retain directions outside the null space are untouched) and, at lamb 0,
    Delta K2 = 0 exactly. Returns Delta."""
    dim = w.shape[1]
    eye = torch.eye(dim, dtype=w.dtype, device=w.device)
    a = targets.T @ targets / len(targets)
    b = anchors.T @ targets / len(targets)
    m = torch.linalg.inv(a @ projector + retain_scale * eye)
    k2 = invariant
    inner = k2.T @ projector @ m @ k2 + lamb * torch.eye(
        k2.shape[1], dtype=w.dtype, device=w.device
    )
    bracket = eye - m @ k2 @ torch.linalg.solve(inner, k2.T @ projector)
    return w @ (b - a) @ projector @ bracket @ m
