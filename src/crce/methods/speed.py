"""SPEED (Li et al., ICLR 2026, "SPEED: Scalable, Precise, and Efficient Concept Erasure for
Diffusion Models"): a closed-form edit of the cross-attention values restricted to the null
space of what must be kept, so the retains' values do not move.

Follows the official code, Ouxiang-Li/SPEED at 6d3df0c92266b1f821d613c73ec45d242716f990
(`train_erase_null.py`, unchanged since 4ebb527): per attn2 to_v (its default `--params V`),
- the target's last subject token (index attention_mask.sum() - 2) and the anchor's (the
  empty prompt's: its start token) as K1 and K*;
- Influence-based Prior Filtering: of the retain embeddings, those the unconstrained edit
  E = W (B - A)(I + A)^-1 moves more than their mean;
- Directed Prior Augmentation: `aug_num` noisy copies of each kept one, the noise along the
  right singular vector of W with the smallest singular value, filtered the same way;
- the null-space projector P of the refined retain set (eigenvalues below `threshold`) and
  the invariance constraint on the empty prompt's start token and 3 k-means centres of its
  other tokens (crce.closed_form.null_space_edit).
The retain set is this pipeline's train retains (the official code reads a CSV of concepts per
task), said so in README's fidelity table; its k-means and augmentation draw from a generator
seeded by (seed, concept), so the same config gives the same edit.
"""

from __future__ import annotations

import logging

from pydantic import Field

from .base import ClosedFormMethod, MethodSettings

log = logging.getLogger(__name__)


class SpeedSettings(MethodSettings):
    strategy: str = "speed"
    params: str = Field(
        "V",
        pattern="^(V|K|KV)$",
        description="edited attn2 projections: V (official default), K, KV",
    )
    aug_num: int = Field(10, ge=0, description="augmented copies per kept retain (DPA; 10)")
    threshold: float = Field(0.1, gt=0, description="eigenvalue bound of the null space (0.1)")
    retain_scale: float = Field(1.0, gt=0, description="alpha, the ridge of the edit (1.0)")
    lamb: float = Field(
        0.0, ge=0, description="softness of the invariance constraint (0: exact; nudity 0.5)"
    )
    filter: bool = Field(True, description="Influence-based Prior Filtering (official: on)")
    guide: str = Field("", description='the anchor ("": the empty prompt\'s start token)')
    clusters: int = Field(3, ge=0, description="k-means centres of the empty prompt's tokens in K2")


def kmeans(points, k: int, generator, iterations: int = 50):
    """Lloyd's k-means (euclidean), initial centres drawn from `generator`: [k, D]."""
    import torch

    centres = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(dim=1)
        moved = torch.stack([points[labels == j].mean(0) if (labels == j).any() else centres[j]
                             for j in range(k)])  # fmt: skip
        if torch.allclose(moved, centres):
            break
        centres = moved
    return centres


class Speed(ClosedFormMethod):
    """SPEED: the null-space constrained edit of every attn2 to_v (K or KV as a knob)."""

    name = "speed"
    Settings = SpeedSettings

    def edited(self, unet) -> list[str]:
        wanted = tuple(f".attn2.to_{p.lower()}.weight" for p in self.settings.params)
        return [n for n, _ in unet.named_parameters() if n.endswith(wanted)]

    def refined_retains(self, w, edit_free, retains, generator):
        """IPF then DPA (module docstring), [N', D]."""
        import torch

        s = self.settings
        if not s.filter or s.aug_num == 0 or len(retains) == 0:
            return retains
        moved = (retains @ edit_free.T).norm(dim=1)
        kept = retains[moved > moved.mean()]
        smallest = torch.linalg.svd(w, full_matrices=True)[2][-1:].T  # [D, 1]
        noise = torch.randn((len(kept), s.aug_num, w.shape[1]), generator=generator,
                            dtype=w.dtype).to(w.device)  # fmt: skip
        copies = (kept[:, None, :] + (noise @ smallest) @ smallest.T).reshape(-1, w.shape[1])
        moved = (copies @ edit_free.T).norm(dim=1)
        return torch.cat([kept, copies[moved > moved.mean()]])

    def solve(self, pipe) -> dict:
        import torch

        from ..closed_form import null_space_edit, null_space_projector
        from ..modeling import encode_prompts
        from ..seeds import derive_seed
        from .uce import last_token_embeddings

        s = self.settings
        generator = torch.Generator().manual_seed(derive_seed("crce-speed", self.seed))
        retain_texts = [i.text for i in self.split.retain_train]
        embeddings = last_token_embeddings(pipe, [self.target, s.guide, *retain_texts]).double()
        target, anchor, retains = embeddings[:1], embeddings[1:2], embeddings[2:]
        empty = encode_prompts(pipe, [""])[0].double()  # start token, then the padding
        invariant = [empty[:1]]
        if s.clusters:
            invariant.append(kmeans(empty[1:].cpu(), s.clusters, generator).to(empty))
        k2 = torch.cat(invariant).T  # [D, 1 + clusters]
        eye = torch.eye(target.shape[1], dtype=torch.float64, device=target.device)
        parameters = dict(pipe.unet.named_parameters())
        edited = {}
        with torch.no_grad():
            for name in self.edited(pipe.unet):
                w = parameters[name].detach().double()
                a, b = target.T @ target, anchor.T @ target
                edit_free = w @ (b - a) @ torch.linalg.inv(eye + a)
                refined = self.refined_retains(w, edit_free, retains, generator)
                projector = null_space_projector(refined, s.threshold)
                delta = null_space_edit(w, target, anchor, projector, k2, s.retain_scale, s.lamb)
                edited[name] = (w + delta).float().cpu().contiguous()
        log.info("SPEED: %d weights; %d retains (%d after filtering and augmentation)",
                 len(edited), len(retains), len(refined))  # fmt: skip
        return edited
