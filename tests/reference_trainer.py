"""A naive second opinion on the erasure math, in the official codes' computation pattern.

Two full UNets (trained + frozen deep copy), one prompt per call as a batch-2 [uncond, cond]
`predict_noise`, fp32, prompts re-encoded at every call. It imports nothing of the trainer:
it repeats the loss (paper eq. 1-3) and the documented randomness protocol on purpose.
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


def seed_for(seed: int, iteration: int) -> int:
    digest = hashlib.sha256(f"crce-train:{seed}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def trained_names(unet, params: str) -> list[str]:
    names = []
    for name, _ in unet.named_parameters():
        attn2 = ".attn2." in name
        keep = {
            "xattn-kv": attn2 and (".to_k." in name or ".to_v." in name),
            "xattn-qk": attn2 and (".to_q." in name or ".to_k." in name),
            "xattn": attn2,
        }[params]
        if keep:
            names.append(name)
    return names


class ReferenceTrainer:
    def __init__(
        self,
        pipe,
        target,
        split,
        *,
        strategy="esd",
        n_corefs=5,
        n_retains=3,
        fixed=False,
        params="xattn-kv",
        lr=1e-5,
        eta=1.0,
        coref_anchor="target",
        xt_model="trained",
        start_guidance=3.0,
        ddim_steps=50,
        alpha=1.0,
        beta=1.0,
        seed=0,
    ):
        self.pipe, self.target = pipe, target
        self.model = pipe.unet
        self.frozen_model = copy.deepcopy(pipe.unet).requires_grad_(False)
        self.model.requires_grad_(False)
        self.names = trained_names(self.model, params)
        parameters = dict(self.model.named_parameters())
        for name in self.names:
            parameters[name].requires_grad_(True)
        self.optimizer = torch.optim.Adam([parameters[n] for n in self.names], lr=lr)
        self.strategy, self.fixed = strategy, fixed
        self.m, self.n = n_corefs, n_retains
        self.eta, self.alpha, self.beta = eta, alpha, beta
        self.coref_anchor, self.xt_model = coref_anchor, xt_model
        self.guidance, self.ddim_steps, self.seed = start_guidance, ddim_steps, seed
        self.corefs = [(i.text, i.weight) for i in split.coref_train]
        self.retains = [(i.text, i.weight) for i in split.retain_train]
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(ddim_steps)
        size = self.model.config.sample_size
        self.shape = (1, self.model.config.in_channels, size, size)
        g = torch.Generator().manual_seed(seed_for(seed, -1))
        self.fixed_draw = (
            torch.randperm(len(self.corefs), generator=g)[:n_corefs].tolist(),
            torch.randperm(len(self.retains), generator=g)[:n_retains].tolist(),
        )

    def embed(self, text):
        tok = self.pipe.tokenizer(
            [text],
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            return self.pipe.text_encoder(tok)[0]

    def predict_noise(self, model, x, t, text):
        """Batch-2 [uncond, cond] call, as the official code's predict_noise."""
        context = torch.cat([self.embed(""), self.embed(text)])
        out = model(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        return out[0:1], out[1:2]

    def loss(self, iteration):
        g = torch.Generator().manual_seed(seed_for(self.seed, iteration))
        i = int(torch.randint(1, self.ddim_steps, (1,), generator=g))
        x = torch.randn(self.shape, generator=g) * self.scheduler.init_noise_sigma
        corefs, retains = [], []
        if self.strategy == "crce":
            if self.fixed:
                ci, ri = self.fixed_draw
            else:
                ci = torch.randperm(len(self.corefs), generator=g)[: self.m].tolist()
                ri = torch.randperm(len(self.retains), generator=g)[: self.n].tolist()
            corefs = [self.corefs[k] for k in ci]
            retains = [self.retains[k] for k in ri]
        sampler = self.model if self.xt_model == "trained" else self.frozen_model
        with torch.no_grad():
            for t in self.scheduler.timesteps[:i]:
                eu, ec = self.predict_noise(sampler, x, t, self.target)
                x = self.scheduler.step(eu + self.guidance * (ec - eu), t, x).prev_sample
        t_ddpm = torch.tensor(int(i / self.ddim_steps * 1000))
        with torch.no_grad():
            e_0, e_p = self.predict_noise(self.frozen_model, x, t_ddpm, self.target)
        anchor = e_0 - self.eta * (e_p - e_0)
        _, e_n = self.predict_noise(self.model, x, t_ddpm, self.target)
        loss = F.mse_loss(e_n, anchor)
        if corefs:
            total = 0.0
            for text, weight in corefs:
                if self.coref_anchor == "self":
                    with torch.no_grad():
                        c_0, c_p = self.predict_noise(self.frozen_model, x, t_ddpm, text)
                    coref_anchor = c_0 - self.eta * (c_p - c_0)
                else:
                    coref_anchor = anchor
                _, c_n = self.predict_noise(self.model, x, t_ddpm, text)
                total = total + weight * F.mse_loss(c_n, coref_anchor)
            loss = loss + self.alpha * total / len(corefs)
        if retains:
            total = 0.0
            for text, weight in retains:
                with torch.no_grad():
                    _, r_star = self.predict_noise(self.frozen_model, x, t_ddpm, text)
                _, r_n = self.predict_noise(self.model, x, t_ddpm, text)
                total = total + weight * F.mse_loss(r_n, r_star)
            loss = loss + self.beta * total / len(retains)
        return loss

    def step(self, iteration):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(iteration)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def grads(self):
        parameters = dict(self.model.named_parameters())
        return {n: parameters[n].grad.detach().clone() for n in self.names}

    def tensors(self):
        parameters = dict(self.model.named_parameters())
        return {n: parameters[n].detach().clone() for n in self.names}
