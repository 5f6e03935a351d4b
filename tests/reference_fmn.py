"""A naive second opinion on Forget-Me-Not, in its official code's pattern
(SHI-Labs/Forget-Me-Not src/train_ti.py and src/train_attn.py): textual inversion by adding
the tokens to a copied tokenizer and resizing a copied text encoder's embedding table, AdamW
over the whole table with the other rows restored after each step; then attn2 processors that
collect the masked attention probabilities (as `MyCrossAttnProcessor` and `AttnController`
do) and AdamW on a deep copy of the UNet. It imports nothing of crce: it repeats the documented
randomness protocol (crce.methods.fmn's docstring) on purpose.
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


def permutation(kind, seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive(kind, seed, epoch)))


def ids_of(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # fmt: skip


def invert(pipe, latents, target, *, seed, steps, lr=1e-3, weight_decay=0.1, norm=0.4,
           count=4, template="a photo of {}"):  # fmt: skip
    """train_ti.py: the tokenizer and text encoder after `steps` inversion steps."""
    tokenizer = copy.deepcopy(pipe.tokenizer)
    encoder = copy.deepcopy(pipe.text_encoder).float()
    unet = copy.deepcopy(pipe.unet).float()
    own = tokenizer(target, add_special_tokens=False).input_ids[:count]
    names = [f"<s{k + 1}>" for k in range(count)]
    tokenizer.add_tokens(names)
    new_ids = tokenizer.convert_tokens_to_ids(names)
    table = encoder.get_input_embeddings().weight.data
    start = torch.randn((count, table.shape[1]), generator=torch.Generator().manual_seed(
        derive("fmn-ti-init", seed))).to(table)  # fmt: skip
    start[: len(own)] = table[own]
    encoder.resize_token_embeddings(len(tokenizer))
    embeddings = encoder.get_input_embeddings()
    embeddings.weight.data[new_ids] = start
    unet.requires_grad_(False)
    encoder.requires_grad_(False)
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.data.clone()
    no_updates = torch.ones(len(tokenizer), dtype=torch.bool)
    no_updates[new_ids] = False
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = ids_of(tokenizer, template.format("".join(names)))
    n = len(latents)
    for step in range(steps):
        item = int(permutation("fmn-ti-epoch", seed, step // n, n)[step % n])
        gen = torch.Generator().manual_seed(derive("fmn-ti", seed, step))
        latent = latents[item : item + 1].float()
        if torch.rand(1, generator=gen).item() > 0.5:
            latent = torch.flip(latent, dims=[3])
        noise = torch.randn(latent.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).long()
        noisy = scheduler.add_noise(latent, noise, t)
        pred = unet(noisy, t, encoder(ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            weight = embeddings.weight
            pre_norm = weight[~no_updates, :].norm(dim=-1, keepdim=True)
            lambda_ = min(1.0, 100 * lr)
            weight[~no_updates] = F.normalize(weight[~no_updates, :], dim=-1) * (
                pre_norm + lambda_ * (norm - pre_norm)
            )
            weight[no_updates] = original[no_updates]
    return tokenizer, encoder, embeddings.weight.data[new_ids].clone()


def forget(pipe, latents, prompt, snippet, *, seed, steps, lr, tokenizer=None, encoder=None,
           use_pooler=True, weight_decay=1e-2):  # fmt: skip
    """train_attn.py: the UNet's parameters and each step's loss after `steps` steps (batch 1)."""
    tokenizer = tokenizer or pipe.tokenizer
    encoder = encoder or pipe.text_encoder
    unet = copy.deepcopy(pipe.unet).float()
    prompt_ids = ids_of(tokenizer, prompt)[0].tolist()
    concept_ids = tokenizer(snippet, add_special_tokens=False).input_ids
    pooler = tokenizer("<|endoftext|>", add_special_tokens=False).input_ids[0]
    positions = [0] * len(prompt_ids)
    for i, tok in enumerate(prompt_ids):
        if tok == concept_ids[0] and prompt_ids[i : i + len(concept_ids)] == concept_ids:
            positions[i : i + len(concept_ids)] = [1] * len(concept_ids)
        if use_pooler and tok == pooler:
            positions[i] = 1
    concept_positions = torch.tensor(positions)[None].bool()

    collected = []

    class Processor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            batch_size, sequence_length, _ = hidden_states.shape
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size=batch_size)  # fmt: skip
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            encoder_hidden_states = (encoder_hidden_states if encoder_hidden_states is not None
                                     else hidden_states)  # fmt: skip
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
            probs = attn.get_attention_scores(query, key, attention_mask)
            bs, _ = concept_positions.shape
            head_num = probs.shape[0] // bs
            collected.append(probs.masked_select(
                concept_positions[:, None, :].repeat(head_num, 1, 1)).reshape(
                    -1, concept_positions[0].sum()))  # fmt: skip
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
            return attn.to_out[1](attn.to_out[0](hidden_states))

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(Processor())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999),
                                  weight_decay=weight_decay, eps=1e-8)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        hidden = encoder(ids_of(tokenizer, prompt))[0]
    n, losses = len(latents), []
    for step in range(steps):
        item = int(permutation("fmn-epoch", seed, step // n, n)[step % n])
        gen = torch.Generator().manual_seed(derive("crce-train", seed, step))
        latent = latents[item : item + 1].float()
        noise = torch.randn(latent.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).long()
        noisy = scheduler.add_noise(latent, noise, t)
        _model_pred = unet(noisy, t, hidden).sample  # unused, as in train_attn.py L560
        loss = torch.cat(collected).norm()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        collected.clear()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in unet.named_parameters()}, losses
