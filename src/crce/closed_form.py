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
    eye = torch.eye(w_old.shape[1], dtype=w_old.dtype, device=w_old.device)
    weighted_erase = erase * erase_weights[:, None]
    weighted_preserve = preserve * preserve_weights[:, None]
    b = lamb * eye + erase.T @ weighted_erase + preserve.T @ weighted_preserve
    a = lamb * w_old + targets.T @ weighted_erase + w_old @ (preserve.T @ weighted_preserve)
    return torch.linalg.solve(b, a.T).T  # B is symmetric: W = A B^-1
