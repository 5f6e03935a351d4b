"""A naive second opinion on the erasure math, in the official CRCE code's computation pattern.

Two full UNets (trained + frozen deep copy); every prediction is the official
`predict_noise`: a batch-2 [uncond, cond] call on a stacked text embedding, combined with
guidance 1; fp32; prompts re-encoded at every call; its own 50-step and 1000-step DDIM
schedules; RealEra and CRCE-Sphere neighbours drawn over the whole stack by rejection, as
`srcs/realera_tools.py` does. It imports nothing of the trainer: it repeats the loss (paper
eq. 1-3) and the documented randomness protocol on purpose.
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
        radius=400.0,
        radius_mode="absolute",
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
        self.radius, self.radius_mode = radius, radius_mode
        self.corefs = [(i.text, i.weight) for i in split.coref_train]
        self.retains = [(i.text, i.weight) for i in split.retain_train]
        self.config = pipe.scheduler.config
        size = self.model.config.sample_size
        self.shape = (1, self.model.config.in_channels, size, size)
        g = torch.Generator().manual_seed(seed_for(seed, -1))
        self.fixed_draw = (
            torch.randperm(len(self.corefs), generator=g)[:n_corefs].tolist(),
            torch.randperm(len(self.retains), generator=g)[:n_retains].tolist(),
        )
        self.timesteps = []  # (ddim index, UNet timestep) of every loss, for tests

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

    def text_embeddings(self, text):
        """Official get_text_embeddings: the stack [uncond; cond]."""
        return torch.cat([self.embed(""), self.embed(text)])

    def predict_noise(self, model, x, t, stack, guidance=1.0):
        """Official predict_noise: a batch-2 call on a stack, then guidance."""
        out = model(torch.cat([x, x]), t, encoder_hidden_states=stack).sample
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    def neighbours(self, stack, g):
        """Official embedding_sampling over the stack, radius absolute or times |e|."""
        limit = self.radius * (stack.norm().item() if self.radius_mode == "relative" else 1)

        def sample(is_coref):
            while True:
                v = torch.randn(stack.shape, generator=g)
                r = torch.rand(1, generator=g).item() * limit
                direction = v - stack
                direction = direction / direction.norm()
                sampled = stack + r * direction
                similarity = F.cosine_similarity(
                    torch.flatten(stack), torch.flatten(sampled), dim=0
                ).item()
                if is_coref and 0.5 <= similarity <= 0.9:
                    return sampled
                if not is_coref and similarity < 0.5:
                    return sampled

        return [sample(True) for _ in range(self.m)], [sample(False) for _ in range(self.n)]

    def loss(self, iteration):
        g = torch.Generator().manual_seed(seed_for(self.seed, iteration))
        i = int(torch.randint(1, self.ddim_steps - 1, (1,), generator=g))
        x = torch.randn(self.shape, generator=g)
        positive = self.text_embeddings(self.target)
        neutral_stack = self.text_embeddings("")
        corefs, retains = [], []  # (stack, weight)
        if self.strategy == "crce":
            if self.fixed:
                ci, ri = self.fixed_draw
            else:
                ci = torch.randperm(len(self.corefs), generator=g)[: self.m].tolist()
                ri = torch.randperm(len(self.retains), generator=g)[: self.n].tolist()
            corefs = [(self.text_embeddings(self.corefs[k][0]), self.corefs[k][1]) for k in ci]
            retains = [(self.text_embeddings(self.retains[k][0]), self.retains[k][1]) for k in ri]
        elif self.strategy == "sphere" or (self.strategy == "realera" and iteration % 2 == 0):
            c, r = self.neighbours(positive, g)
            corefs, retains = [(n, 1.0) for n in c], [(n, 1.0) for n in r]
        scheduler = DDIMScheduler.from_config(self.config)
        scheduler.set_timesteps(self.ddim_steps)
        x = x * scheduler.init_noise_sigma
        sampler = self.model if self.xt_model == "trained" else self.frozen_model
        with torch.no_grad():
            for t in scheduler.timesteps[:i]:
                e = self.predict_noise(sampler, x, t, positive, self.guidance)
                x = scheduler.step(e, t, x).prev_sample
        scheduler.set_timesteps(1000)
        t = scheduler.timesteps[int(i / self.ddim_steps * 1000)]
        self.timesteps.append((i, int(t)))
        with torch.no_grad():
            e_p = self.predict_noise(self.frozen_model, x, t, positive)
            e_0 = self.predict_noise(self.frozen_model, x, t, neutral_stack)
        anchor = e_0 - self.eta * (e_p - e_0)
        esd = F.mse_loss(self.predict_noise(self.model, x, t, positive), anchor)
        if self.strategy == "realera":
            if iteration % 2:
                return esd
            loss = 0.0
            for stack, _ in corefs:
                loss = loss + F.mse_loss(self.predict_noise(self.model, x, t, stack), anchor)
            for stack, _ in retains:
                with torch.no_grad():
                    original = self.predict_noise(self.frozen_model, x, t, stack)
                loss = loss + F.mse_loss(self.predict_noise(self.model, x, t, stack), original)
            return loss
        loss = esd
        if corefs:
            total = 0.0
            for stack, weight in corefs:
                if self.coref_anchor == "self":
                    with torch.no_grad():
                        c_p = self.predict_noise(self.frozen_model, x, t, stack)
                    coref_anchor = e_0 - self.eta * (c_p - e_0)
                else:
                    coref_anchor = anchor
                c_n = self.predict_noise(self.model, x, t, stack)
                total = total + weight * F.mse_loss(c_n, coref_anchor)
            loss = loss + self.alpha * total / len(corefs)
        if retains:
            total = 0.0
            for stack, weight in retains:
                with torch.no_grad():
                    r_star = self.predict_noise(self.frozen_model, x, t, stack)
                r_n = self.predict_noise(self.model, x, t, stack)
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
