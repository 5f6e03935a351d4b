"""A naive second opinion on Concept Ablation, in its official loop's pattern
(nupurkmr9/concept-ablation diffusers/train.py): a deep copy of the UNet trained with AdamW on
its attn2 to_k/to_v, a fresh text-encoder call per prompt per step, a DataLoader-like walk over
the dataset, the loss written as train.py writes it. It imports nothing of crce: it repeats the
documented randomness protocol (crce.methods.ca's docstring) on purpose.
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def derive(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def train_ca(pipe, latents, anchor_prompts, anchor, target, *, seed, iterations, lr, batch,
             prior, model_based=True, hflip=True, prior_weight=1.0):  # fmt: skip
    """The attn2 K/V tensors after `iterations` official CA steps."""
    unet = copy.deepcopy(pipe.unet).float()
    unet.requires_grad_(False)
    params = {n: p for n, p in unet.named_parameters()
              if "attn2.to_k" in n or "attn2.to_v" in n}  # fmt: skip
    for p in params.values():
        p.requires_grad_(True)
    # --scale_lr with one process, no accumulation; x2 with prior preservation (L861-868)
    scaled = lr * batch * (2 if prior else 1)
    optimizer = torch.optim.AdamW(params.values(), lr=scaled, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    n = len(latents)
    instances = torch.randperm(
        n, generator=torch.Generator().manual_seed(derive("ca-instances", seed))
    )

    def encode(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        return pipe.text_encoder(ids)[0]

    h, w = latents.shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    mask[..., 1 : h - 1, 1 : w - 1] = 1.0
    for k in range(iterations):
        dataset_items = []
        for position in range(k * batch, (k + 1) * batch):
            epoch = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive("ca-epoch", seed, position // n))
            )
            dataset_items.append(int(epoch[position % n]))
        inst = [int(instances[j]) for j in dataset_items]
        images = [latents[i] for i in inst]
        input_prompts = [anchor_prompts[i].replace(anchor, target) for i in inst]
        anchor_input = [anchor_prompts[i] for i in inst]
        if prior:
            images += [latents[j] for j in dataset_items]
            input_prompts += [anchor_prompts[j] for j in dataset_items]
        gen = torch.Generator().manual_seed(derive("crce-train", seed, k))
        x = torch.stack(images)
        if hflip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.stack([img.flip(-1) if f else img for img, f in zip(x, flip, strict=True)])
        noise = torch.randn(x.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (len(x),), generator=gen)
        noisy = scheduler.add_noise(x, noise, timesteps)
        with torch.no_grad():
            encoder_hidden_states = encode(input_prompts)
            encoder_anchor_hidden_states = encode(anchor_input)
        model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
        with torch.no_grad():
            model_pred_anchor = unet(
                noisy[:batch], timesteps[:batch], encoder_anchor_hidden_states
            ).sample
        if model_based:
            target_eps = model_pred_anchor
            target_prior = noise[batch:]
        else:
            target_eps, target_prior = noise[:batch], noise[batch:]
        model_pred, model_pred_prior = model_pred[:batch], model_pred[batch:]
        loss = F.mse_loss(model_pred.float(), target_eps.float(), reduction="none")
        loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        if prior:
            loss = loss + prior_weight * F.mse_loss(model_pred_prior.float(), target_prior.float())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
    return {n: p.detach().clone() for n, p in params.items()}
