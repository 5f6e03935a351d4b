"""A naive second opinion on SalUn, in its official SD code's pattern (OPTML-Group/
Unlearn-Saliency SD/train-scripts): generate_mask.py's gradient pass and its argsort ranking,
then random_label.py's loop with `p.grad *= mask` before a plain Adam step, on a deep copy of
the UNet. It imports nothing of crce and repeats the documented randomness protocol
(crce.methods.salun's docstring) on purpose.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
from diffusers import DDPMScheduler


def derive(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def official_mask(gradients: dict, share: float) -> dict:
    """generate_mask.py: rank every |gradient| entry, keep the ranks below share x N."""
    gradients = {k: torch.abs(v) for k, v in gradients.items()}
    all_elements = -torch.cat([t.flatten() for t in gradients.values()])
    threshold_index = int(len(all_elements) * share)
    # The official argsort is torch's default; stable here, so that ties rank by position.
    positions = torch.argsort(all_elements, stable=True)
    ranks = torch.argsort(positions)
    hard, start = {}, 0
    for key, tensor in gradients.items():
        n = tensor.numel()
        tensor_ranks = ranks[start : start + n]
        threshold = torch.zeros_like(tensor_ranks)
        threshold[tensor_ranks < threshold_index] = 1
        hard[key] = threshold.reshape(tensor.shape)
        start += n
    return hard


def train_salun(pipe, forget, forget_prompts, remain, remain_prompts, pseudo_prompt, *, seed,
                iterations, lr, batch, alpha, share=0.5, guidance=7.5):  # fmt: skip
    """(mask, trained UNet parameters, each step's loss) after the official mask pass and
    `iterations` steps, in the pipeline's dtype."""
    unet = copy.deepcopy(pipe.unet)
    dtype = unet.dtype
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    criteria = torch.nn.MSELoss()

    def encode(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return pipe.text_encoder(ids)[0].to(dtype)

    def q_sample(x, gen):
        t = torch.randint(0, 1000, (len(x),), generator=gen).long()
        noise = torch.randn(x.shape, generator=gen).to(dtype)
        return scheduler.add_noise(x.to(dtype), noise, t), noise, t

    # generate_mask.py: one pass, gradients summed over the batches
    gradients = {name: 0 for name, _ in unet.named_parameters()}
    for i, start in enumerate(range(0, len(forget), batch)):
        gen = torch.Generator().manual_seed(derive("salun-mask", seed, i))
        unet.zero_grad()
        images = forget[start : start + batch]
        noisy, noise, t = q_sample(images, gen)
        forget_out = unet(noisy, t, encode(forget_prompts[start : start + batch])).sample
        null_out = unet(noisy, t, encode([""] * len(images))).sample
        preds = (1 + guidance) * forget_out - guidance * null_out
        loss = -criteria(noise, preds)
        loss.backward()
        for name, param in unet.named_parameters():
            if param.grad is not None:
                gradients[name] += param.grad.data.cpu()
    gradients = {k: v if torch.is_tensor(v) else torch.zeros_like(p)
                 for (k, v), p in zip(gradients.items(), unet.parameters(), strict=True)}  # fmt: skip
    mask = official_mask(gradients, share)
    unet.zero_grad()

    # random_label.py
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    forget_batches = math.ceil(len(forget) / batch)
    remain_batches = math.ceil(len(remain) / batch)
    losses = []
    for k in range(iterations):
        optimizer.zero_grad()
        epoch, step = divmod(k, forget_batches)
        cycle, j = divmod(step, remain_batches)
        order = torch.randperm(len(remain), generator=torch.Generator().manual_seed(
            derive("salun-remain", seed, epoch, cycle)))  # fmt: skip
        remain_idx = order[j * batch : (j + 1) * batch].tolist()
        forget_idx = list(range(step * batch, min(step * batch + batch, len(forget))))
        gen = torch.Generator().manual_seed(derive("crce-train", seed, k))
        # remain stage: LDM shared_step (t, noise drawn inside), l_simple = MSE mean
        r_noisy, r_noise, r_t = q_sample(remain[remain_idx], gen)
        r_out = unet(r_noisy, r_t, encode([remain_prompts[i] for i in remain_idx])).sample
        remain_loss = criteria(r_out, r_noise)
        # forget stage
        f_noisy, _, f_t = q_sample(forget[forget_idx], gen)
        forget_out = unet(f_noisy, f_t, encode([forget_prompts[i] for i in forget_idx])).sample
        pseudo_out = unet(f_noisy, f_t, encode([pseudo_prompt] * len(forget_idx))).sample.detach()
        loss = criteria(forget_out, pseudo_out) + alpha * remain_loss
        losses.append(loss.item())
        loss.backward()
        for n, p in unet.named_parameters():
            if p.grad is not None:
                p.grad *= mask[n]
        optimizer.step()
    return mask, {n: p.detach().clone() for n, p in unet.named_parameters()}, losses
