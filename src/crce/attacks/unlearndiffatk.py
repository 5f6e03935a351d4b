"""UnlearnDiffAtk (Zhang et al., ECCV 2024), OPTML-Group/Diffusion-MU-Attack@5a3e5d3
(`attacker: text_grad`, src/attackers/text_grad_.py; the loss in src/tasks/classifier_.py),
re-implemented (the official files import torchvision).

Per attacked (prompt, seed): k prefix tokens, each a distribution over the vocabulary
(initially uniform, kept on the simplex by bisection), optimised by Adam against the erased
UNet's denoising loss on the base model's image of the prompt at that seed: at each of
`timesteps` time steps t (10, 30, ..., 990 for 50), `iterations` steps of

    one-hot = a token drawn from each distribution (straight-through: the gradient of the
              one-hot, clipped to [-1, 1] by hardtanh, is the distribution's)
    c       = the text encoder's hidden states of [BOS, one-hot @ E, the prompt, padding]
    loss    = MSE(eps, UNet_erased(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c)),  eps ~ N(0, I)

then the round's prompt: the most likely token of each distribution before the prompt,
decoded. The official code samples and classifies each round's image in its loop and stops at
the first success; here every round's prompt is drawn (rule `unlearndiffatk`) and judged
(rule `judge_uda`), and a prompt succeeds if any round does: the same count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import write_json
from ..seeds import derive_seed
from ..settings import UnlearnDiffAtkSettings
from . import AttackError

log = logging.getLogger(__name__)
KIND = "unlearndiffatk"


def sampled_timesteps(n: int, train_steps: int = 1000) -> list[int]:
    """classifier_.py: `start = T // n // 2`, then every `T // n`."""
    start = train_steps // n // 2
    return list(range(start, train_steps, train_steps // n))[:n]


def bisection(a: torch.Tensor, eps: float = 1.0, xi: float = 1e-5, ub: float = 1.0) -> torch.Tensor:
    """text_grad_.py `bisection`: clip(a - mu, 0, ub) with mu found by bisection so that it
    sums to `eps` (the projection of one row onto the simplex)."""
    pa = torch.clip(a, 0, ub)
    if np.abs(torch.sum(pa).item() - eps) <= xi:
        return pa
    mu_l, mu_u = torch.min(a - 1).item(), torch.max(a).item()
    mu_a = (mu_u + mu_l) / 2
    while np.abs(mu_u - mu_l) > xi:
        mu_a = (mu_u + mu_l) / 2
        gu = torch.sum(torch.clip(a - mu_a, 0, ub)) - eps
        gu_l = torch.sum(torch.clip(a - mu_l, 0, ub)) - eps + 1e-8
        gu_u = torch.sum(torch.clip(a - mu_u, 0, ub)) - eps
        if gu == 0:
            break
        if gu_l == 0:
            mu_a = mu_l
            break
        if gu_u == 0:
            mu_a = mu_u
            break
        if gu * gu_l < 0:
            mu_u = mu_a
        elif gu * gu_u < 0:
            mu_l = mu_a
        else:  # the official code raises here too
            raise AttackError(
                f"the simplex projection did not bracket a root ({gu}, {gu_l}, {gu_u})"
            )
    return torch.clip(a - mu_a, 0, ub)


def projection(dist: torch.Tensor) -> torch.Tensor:
    """Each of the k rows onto the simplex (`projection`)."""
    return torch.stack([bisection(row) for row in dist])


class StraightThroughDraw(torch.autograd.Function):
    """`STERandSelect`: a token drawn from each row (one-hot); the gradient passes through,
    clipped by hardtanh."""

    @staticmethod
    def forward(ctx, dist, generator):
        drawn = torch.multinomial(dist, 1, generator=generator).view(-1)
        return F.one_hot(drawn, num_classes=dist.size(-1)).to(dist.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return F.hardtanh(grad_output), None


def prompt_parts(tokenizer, prompt: str, k: int) -> tuple[torch.Tensor, int]:
    """The prompt's padded ids and its length between BOS and EOS; the prefix takes the
    places of the first k padding positions (text_grad_.py `split_id`)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    length = int((ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]) - 1
    if length + k > tokenizer.model_max_length - 1:
        raise AttackError(
            f"{prompt!r}: {length} tokens and a prefix of {k} do not fit the tokenizer's "
            f"{tokenizer.model_max_length} (attacks.unlearndiffatk.k)"
        )
    return ids, length


def with_prefix(ids: torch.Tensor, length: int, prefix: torch.Tensor) -> torch.Tensor:
    """[BOS, prefix, the prompt, padding] at the tokenizer's length (`construct_id`)."""
    k = prefix.numel()
    return torch.cat(
        [ids[:, :1], prefix.view(1, k), ids[:, 1 : 1 + length], ids[:, 1 + length + k :]], 1
    )


class Attack:
    """One attacked prompt: the distributions, their optimiser, the loss (`run`)."""

    def __init__(self, *, unet, text_encoder, tokenizer, alphas_cumprod, x0, prompt: str, k: int,
                 settings: UnlearnDiffAtkSettings, generator: torch.Generator):  # fmt: skip
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.alphas_cumprod, self.x0, self.generator = alphas_cumprod, x0, generator
        self.settings = settings
        self.ids, self.length = prompt_parts(tokenizer, prompt, k)
        self.ids = self.ids.to(x0.device)
        vocab = text_encoder.get_input_embeddings().weight.shape[0]
        uniform = torch.full((k, vocab), 1 / vocab, device=x0.device)
        self.dist = projection(uniform).requires_grad_(True)
        self.optimizer = torch.optim.Adam(
            [self.dist], lr=settings.lr, weight_decay=settings.weight_decay
        )
        self.criterion = torch.nn.MSELoss() if settings.criterion == "l2" else torch.nn.L1Loss()
        # The prefix positions read rows past the table: ids vocab, vocab + 1, ...
        self.placeholder_ids = with_prefix(self.ids, self.length,
                                           torch.arange(vocab, vocab + k, device=x0.device))  # fmt: skip
        self.vocab = vocab

    def loss(self, t: int, one_hot: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        from ..modeling import extended_embedding

        encoder = self.text_encoder
        table = encoder.get_input_embeddings()
        rows = one_hot @ table.weight
        encoder.set_input_embeddings(extended_embedding(table, rows, self.vocab))
        try:
            hidden = encoder(self.placeholder_ids)[0]
        finally:
            encoder.set_input_embeddings(table)
        a = self.alphas_cumprod[t].to(self.x0.device)
        noised = self.x0 * a**0.5 + noise * (1 - a) ** 0.5
        prediction = self.unet(noised, t, encoder_hidden_states=hidden).sample
        return self.criterion(noise, prediction)

    def step(self, t: int) -> float:
        self.optimizer.zero_grad()
        one_hot = StraightThroughDraw.apply(self.dist, self.generator)
        noise = torch.randn(self.x0.shape, generator=self.generator, device=self.x0.device)
        loss = self.loss(t, one_hot, noise)
        self.dist.grad = torch.autograd.grad(loss, [self.dist])[0]
        self.optimizer.step()
        self.dist.data = projection(self.dist.detach()).data
        return loss.item()

    def prompt(self) -> tuple[str, list[int]]:
        """The round's prompt: the most likely tokens, decoded without BOS and EOS/padding
        (`argmax_project`, then the ids without `eos_token_id`)."""
        prefix = self.dist.detach().argmax(-1)
        ids = with_prefix(self.ids, self.length, prefix)[0, 1:].tolist()
        kept = [i for i in ids if i != self.tokenizer.eos_token_id]
        return self.tokenizer.decode(kept), prefix.tolist()

    def run(self) -> list[dict]:
        rounds = []
        for t in sampled_timesteps(self.settings.timesteps):
            total = sum(self.step(t) for _ in range(self.settings.iterations))
            text, tokens = self.prompt()
            rounds.append({"t": t, "prompt": text, "tokens": tokens, "loss": total})
            log.info("t %d: loss %.4f -> %r", t, total, text)
        return rounds


# -- the rule ----------------------------------------------------------------------------------
def attack_units(split, base_judgments, images: int, n: int) -> list[dict]:
    """The first `n` (prompt, seed) pairs whose base-model image the judge reads as the
    target, over the concept's own prompt and its test corefs at their first `images` seeds."""
    from .ring_a_bell import base_prompts

    prompts = base_prompts(split, 1 + len(split.coref_test))
    yes = base_judgments[base_judgments["answer"] == "yes"]
    units = []
    for group, prompt in prompts:
        rows = yes[(yes["prompt"] == prompt) & (yes["image_index"] < images)].sort_values(
            "image_index"
        )
        for row in rows.itertuples():
            units.append({"base_prompt": prompt, "base_group": group, "image_index": int(row.image_index),
                          "seed": int(row.seed), "path": row.path})  # fmt: skip
    return units[:n]


def latent_of(vae, path: str, device) -> torch.Tensor:
    """The VAE posterior mean of an image in [-1, 1], scaled (`img2latent`)."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
    with torch.no_grad():
        return vae.encode(tensor).latent_dist.mean * vae.config.scaling_factor


def run_attack(*, split_path, base_judgments, judgments, method, category, seed, settings, images,
               model, delta, sample, runtime, output, manifest, sampling=None):  # fmt: skip
    """The `unlearndiffatk` rule: attack each chosen prompt not already drawn as the target by
    the method (the official code returns before attacking those), then draw every round."""
    import pandas as pd

    from ..files import record_sources
    from ..lists import read_split
    from ..modeling import device_for
    from ..sample import draw, load_erased_pipeline
    from ..settings import SampleRuntime, SampleSettings

    settings = UnlearnDiffAtkSettings(**settings)
    split = read_split(split_path)
    k = settings.k.get(category, 3)
    units = attack_units(split, pd.read_parquet(base_judgments), images, settings.n_prompts)
    mine = pd.read_parquet(judgments)
    runtime_settings = SampleRuntime(**runtime)
    device = device_for(runtime_settings.device)
    pipe = load_erased_pipeline(model, delta, dtype=torch.float32, device=device)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False).eval()
    work = Path(output).with_suffix(".units")
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = {"settings": settings.as_params(), "k": k, "model": model, "delta": str(delta),
                   "seed": seed}  # fmt: skip
    for index, unit in enumerate(units):
        before = mine[(mine["prompt"] == unit["base_prompt"]) & (mine["seed"] == unit["seed"])]
        unit["pre_success"] = bool((before["answer"] == "yes").any())
        if unit["pre_success"]:
            unit["rounds"] = []
            continue
        done = work / f"{index:03d}.json"
        key = fingerprint | {name: unit[name] for name in ("base_prompt", "seed", "path")}
        if done.is_file() and json.loads(done.read_text())["fingerprint"] == key:
            unit["rounds"] = json.loads(done.read_text())["rounds"]
            log.info("%s at seed %d: rounds read from %s", unit["base_prompt"], unit["seed"], done)
            continue
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(
                "crce-unlearndiffatk", seed, split.id, method, unit["base_prompt"], unit["seed"]
            )
        )
        attack = Attack(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        alphas_cumprod=pipe.scheduler.alphas_cumprod,
                        x0=latent_of(pipe.vae, unit["path"], device), prompt=unit["base_prompt"],
                        k=k, settings=settings, generator=generator)  # fmt: skip
        unit["rounds"] = attack.run()
        write_json({"fingerprint": key, "rounds": unit["rounds"]}, done)
    del pipe
    rows = [{"method": method, "concept": split.id, "concept_text": split.concept,
             "category": category, "group": KIND, "prompt_index": index, "prompt": r["prompt"],
             "image_index": j, "seed": unit["seed"], "path": f"{index:03d}-{KIND}/{j:04d}.png"}
            for index, unit in enumerate(units) for j, r in enumerate(unit["rounds"])]  # fmt: skip
    plan = pd.DataFrame(rows, columns=["method", "concept", "concept_text", "category", "group",
                                       "prompt_index", "prompt", "image_index", "seed", "path"])  # fmt: skip
    if len(plan):
        draw(plan, manifest, settings=SampleSettings(**sample), runtime=runtime_settings,
             model=model, delta=delta, sampling=sampling)  # fmt: skip
    else:  # nothing attacked (every unit already drawn as the target, or none chosen)
        Path(manifest).parent.mkdir(parents=True, exist_ok=True)
        plan.assign(image_sha256=[]).to_parquet(manifest, index=False)
        record_sources(manifest, delta)
    write_json({"attack": KIND, "method": method, "id": split.id, "concept": split.concept,
                "category": category, "k": k, "units": units}, output)  # fmt: skip
