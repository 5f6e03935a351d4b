"""SPM (Lyu et al., CVPR 2024, "One-dimensional Adapter to Rule Them All"): a rank-1 adapter on
every Linear and Conv2d inside the UNet's transformer blocks, trained with the ESD-style erase
loss plus latent anchoring, and scaled per prompt at sampling time ("facilitated transport").

Follows Con6924/SPM at 3dd762e (re-implemented; its files import torchvision and bitsandbytes):
src/models/spm.py (the adapter), train_spm.py with src/engine/train_util.py and
src/engine/sampling.py (the loss), infer_spm.py (the transport). README's fidelity table lists
each default, paper vs code.

The delta holds the adapter merged at multiplier 1 under the UNet's names (what any SD pipeline
loads, and what the export saves: no transport), plus the adapter's factors and the transport's
scorer under `adapter.` (crce.deltas.ADAPTER_PREFIX), which the sampler's per-prompt hook reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Literal

from pydantic import Field

from ..deltas import ADAPTER_PREFIX as PREFIX  # tensors that are not UNet weights
from .base import IterativeMethod, IterativeSettings, Sampling

log = logging.getLogger(__name__)
SCORER_EMBEDDING = PREFIX + "scorer.embedding"  # the target's text-encoder states (1, L, D)
SCORER_TOKENS = PREFIX + "scorer.tokens"  # its token ids, special tokens removed


class SpmSettings(IterativeSettings):
    # configs/snoopy/config.yaml and prompt.yaml (pikachu's are the same): every category.
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (official configs 1e-4)")
    iterations: int = Field(3000, ge=1, description="optimiser steps (official configs 3,000)")
    rank: int = Field(1, ge=1, description="adapter rank (official: 1, the 'one-dimensional')")
    alpha: float = Field(1.0, gt=0, description="adapter scale is alpha / rank (official 1.0)")
    la_strength: float = Field(
        1000.0, ge=0, description="weight of the latent-anchoring loss (official 1000)"
    )
    anchors: int = Field(
        4, ge=0, description="latent anchors drawn per iteration (official sampling_batch_size 4)"
    )
    anchor_batch: Literal["all", "official"] = Field(
        "all",
        description="`all`: every anchor enters the loss (the paper); `official`: as "
        "train_spm.py's batch order makes it, the empty prompt twice and the last two anchors",
    )
    erase_guidance: float = Field(
        1.0, description="eta of the erase target eps_n - eta (eps_p - eps_n) (official 1.0)"
    )
    rollout_steps: int = Field(
        30, ge=3, description="DDIM steps of the x_t rollout, i ~ U{1..29} (max_denoising_steps)"
    )
    rollout_guidance: float = Field(3.0, description="CFG of the x_t rollout (official 3)")
    dynamic_resolution: bool = Field(
        True,
        description="x_t's height and width each drawn from 4/8..7/8 of the model's size "
        "(official: randint(4, 8) * 64 px at 512)",
    )
    lr_warmup: int = Field(500, ge=0, description="cosine_with_restarts warm-up steps (official)")
    lr_cycles: int = Field(3, ge=1, description="cosine_with_restarts cycles (official 3)")
    transport: Literal["clipcos_tokenuni", "clipcos", "tokenuni", "none"] = Field(
        "clipcos_tokenuni",
        description="per-prompt multiplier at sampling (infer_spm.py's --matching_metric): the "
        "max of the cosine of the prompt's and the target's text states and the share of the "
        "target's tokens in the prompt; `none`: multiplier 1 (the merged adapter)",
    )
    transport_power: Literal[1, 2] = Field(
        1,
        description="1: the adapter scaled by the multiplier m (the paper); 2: m^2, as "
        "infer_spm.py scales both factors of the adapter by m",
    )


class Spm(IterativeMethod):
    """The adapter trains alone (the UNet frozen): its own objective and delta."""

    name = "spm"
    Settings = SpmSettings
    own_keys = frozenset(SpmSettings.model_fields) - {"strategy", "precision"}
    optimizer = "AdamW"  # official bitsandbytes AdamW8bit: same defaults, 8-bit states

    def trainable(self, unet) -> list[str]:
        return []  # the adapter's factors are its `extra_parameters`

    def extra_parameters(self, engine) -> dict:
        self.adapter = Adapter(engine.unet, self.settings.rank, self.settings.alpha)
        self.adapter.to(engine.device)
        return dict(self.adapter.named_parameters())

    @classmethod
    def bounded(cls, settings: SpmSettings, max_iterations: int) -> SpmSettings:
        """Fewer iterations keep the schedule's shape: the warm-up is the same share of the
        run (official 500 of 3,000), else a short run would end inside it."""
        bounded = super().bounded(settings, max_iterations)
        if bounded is settings:
            return settings
        share = settings.lr_warmup / settings.iterations
        return bounded.model_copy(update={"lr_warmup": round(share * max_iterations)})

    def lr_factor(self, iteration: int) -> float:
        return cosine_with_restarts(
            iteration, self.settings.lr_warmup, self.settings.iterations, self.settings.lr_cycles
        )

    @classmethod
    def objective(cls, engine, methods):
        return SpmObjective(engine, methods)

    def delta(self, tensors: dict) -> dict:
        """The adapter merged into its modules' weights, its factors and the scorer."""
        import torch

        merged = self.adapter.merged()
        factors = {
            PREFIX + k: v.detach().float().cpu() for k, v in self.adapter.state_dict().items()
        }
        pipe = self.engine.pipe
        embedding = self.engine.prompts.target.detach().float().cpu()  # encoded once, by the engine
        tokens = torch.tensor(content_tokens(pipe.tokenizer, self.target), dtype=torch.int64)
        return {**merged, **factors, SCORER_EMBEDDING: embedding, SCORER_TOKENS: tokens}

    def delta_metadata(self) -> dict:
        return {"adapter": {"rank": self.settings.rank, "alpha": self.settings.alpha}}

    @classmethod
    def sampling(cls, settings, delta, concept, split=None):
        if settings.transport == "none" or delta is None:
            return None
        return Transport(settings, delta)


# -- the adapter (src/models/spm.py) -----------------------------------------------------------
def adapted_modules(unet) -> dict:
    """Every module named exactly Linear or Conv2d inside a Transformer2DModel
    (spm.py: UNET_TARGET_REPLACE_MODULE_TRANSFORMER, `create_modules`)."""
    found = {}
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    found[f"{name}.{child_name}"] = child
    return found


class Adapter:
    """Rank-r factors per module, added to its output as up(down(x)) * m * alpha / r through a
    forward hook (spm.py: SPMLayer.forward); `m` is one multiplier or one per batch row."""

    def __init__(self, unet, rank: int, alpha: float):
        import torch

        self.scale = alpha / rank
        self.modules = adapted_modules(unet)
        self.factors = torch.nn.ModuleDict()
        for name, module in self.modules.items():
            if isinstance(module, torch.nn.Conv2d):
                r = min(rank, module.in_channels, module.out_channels)
                down = torch.nn.Conv2d(module.in_channels, r, module.kernel_size, module.stride,
                                       module.padding, bias=False)  # fmt: skip
                up = torch.nn.Conv2d(r, module.out_channels, 1, bias=False)
            else:
                down = torch.nn.Linear(module.in_features, rank, bias=False)
                up = torch.nn.Linear(rank, module.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(up.weight)
            pair = torch.nn.Module()
            pair.down, pair.up = down.to(module.weight), up.to(module.weight)
            self.factors[name.replace(".", "_")] = pair
        self.multiplier = 0.0
        self.handles = []

    def named_parameters(self):
        return self.factors.named_parameters()

    def state_dict(self) -> dict:
        """The factors by module name: `<module>.down`, `<module>.up`."""
        return {
            f"{name}.{part}": getattr(pair, part).weight
            for name, pair in zip(self.modules, self.factors.values(), strict=True)
            for part in ("down", "up")
        }

    def to(self, device):
        self.factors.to(device)
        return self

    def load(self, tensors: dict) -> None:
        import torch

        with torch.no_grad():
            for name, pair in zip(self.modules, self.factors.values(), strict=True):
                for part in ("down", "up"):
                    getattr(pair, part).weight.copy_(tensors[f"{PREFIX}{name}.{part}"])

    def residual(self, pair, x):
        return pair.up(pair.down(x)) * self.scale

    def attach(self) -> None:
        """Hook every module: output += residual * self.multiplier, read at each call."""
        for module, pair in zip(self.modules.values(), self.factors.values(), strict=True):
            self.handles.append(module.register_forward_hook(self._hook(pair)))

    def _hook(self, pair):
        def hook(module, inputs, output):
            m = self.multiplier
            if not isinstance(m, float):  # one per prompt: [uncond; cond] rows under CFG
                m = m.to(output).repeat(output.shape[0] // len(m))
                m = m.view(-1, *([1] * (output.dim() - 1)))
            elif m == 0.0:
                return output
            return output + self.residual(pair, inputs[0]) * m

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def merged(self) -> dict:
        """Each module's weight with the adapter merged at multiplier 1 (UNet names)."""
        import torch

        out = {}
        for name, module, pair in zip(self.modules, self.modules.values(), self.factors.values(),
                                      strict=True):  # fmt: skip
            down, up = pair.down.weight.detach().float(), pair.up.weight.detach().float()
            if isinstance(module, torch.nn.Conv2d):
                product = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                product = up @ down
            out[f"{name}.weight"] = (module.weight.detach().float() + self.scale * product).cpu()
        return out


def cosine_with_restarts(step: int, warmup: int, total: int, cycles: int) -> float:
    """diffusers' cosine_with_restarts factor (the official lr_scheduler)."""
    return _schedule(warmup, total, cycles)(step)


@functools.cache
def _schedule(warmup: int, total: int, cycles: int):
    """The schedule's step -> factor function, built once per (warm-up, total, cycles)."""
    import torch
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, warmup, total, cycles)
    return schedule.lr_lambdas[0]


# -- the objective (train_spm.py, train_util.py, sampling.py) ---------------------------------
def draw_anchors(target, count: int, generator):
    """Latent anchors (sampling.py `sample`): unit Gaussian text states, kept with probability
    1 - cos(target, noise), scaled to U[0.8, 1.2) times the target's norm."""
    import torch

    flat = target.flatten().float()
    anchors = []
    while len(anchors) < count:
        noise = torch.randn(target.shape, generator=generator).to(target)
        noise = noise / noise.norm()
        cosine = torch.dot(flat, noise.flatten().float()) / flat.norm()
        accept = float(torch.rand((), generator=generator)) < 1 - float(cosine)
        if accept:
            factor = 0.8 + 0.4 * float(torch.rand((), generator=generator))
            anchors.append(factor * noise * target.norm())
    return torch.cat(anchors) if anchors else target[:0]


class SpmObjective:
    """One iteration: x_t from a DDIM rollout with the adapter on; the erase loss on the
    target's prediction with the adapter on against the frozen model's; latent anchoring."""

    def __init__(self, engine, methods):
        from diffusers import DDIMScheduler

        ((self.name, self.method),) = methods.items()
        self.engine, self.s = engine, self.method.settings
        config = engine.pipe.scheduler.config
        self.scheduler = DDIMScheduler.from_config(config)
        self.scheduler.set_timesteps(self.s.rollout_steps)
        self.loss_schedule = DDIMScheduler.from_config(config)
        self.loss_schedule.set_timesteps(self.loss_schedule.config.num_train_timesteps)
        self.last_step = {}

    def predict(self, latents, timestep, context, multiplier: float):
        self.method.adapter.multiplier = multiplier
        return self.engine.predict(latents, timestep, context, [len(latents)])

    def losses(self, iteration: int) -> dict:
        import torch
        import torch.nn.functional as F

        engine, s, adapter = self.engine, self.s, self.method.adapter
        if not adapter.handles:
            adapter.attach()
        generator = engine.generator(iteration)
        index = int(torch.randint(1, s.rollout_steps, (1,), generator=generator))
        _, channels, size, _ = engine.latent_shape
        if s.dynamic_resolution:  # randint(4, 8) * 64 px of 512: eighths of the model's size
            h, w = (int(torch.randint(4, 8, (1,), generator=generator)) * size // 8 for _ in "hw")
        else:
            h = w = size
        noise = torch.randn((1, channels, h, w), generator=generator).to(
            engine.device, engine.dtype
        )
        prompts = engine.prompts
        with torch.no_grad():
            latents = noise * self.scheduler.init_noise_sigma
            context = torch.cat([prompts.uncond, prompts.target])
            for timestep in self.scheduler.timesteps[:index]:
                pair = self.predict(latents.repeat(2, 1, 1, 1), timestep, context, 1.0)
                guided = pair[0:1] + s.rollout_guidance * (pair[1:2] - pair[0:1])
                latents = self.scheduler.step(
                    guided.to(latents.dtype), timestep, latents
                ).prev_sample
            schedule = self.loss_schedule.timesteps
            t = schedule[int(index * len(schedule) / s.rollout_steps)].to(engine.device)
            frozen = self.predict(latents.repeat(2, 1, 1, 1), t, context, 0.0)
            neutral, positive = frozen[0:1], frozen[1:2]
        goal = neutral - s.erase_guidance * (positive - neutral)
        erased = self.predict(latents, t, prompts.target, 1.0)
        loss = F.mse_loss(erased.float(), goal.float())
        anchors = draw_anchors(prompts.target, s.anchors, generator)
        if s.anchor_batch == "official" and len(anchors) >= 2:
            anchors = torch.cat([prompts.uncond, anchors[-2:-1], prompts.uncond, anchors[-1:]])
        if len(anchors) and s.la_strength:
            batch = latents.repeat(len(anchors), 1, 1, 1)
            with torch.no_grad():
                before = self.predict(batch, t, anchors, 0.0)
            after = self.predict(batch, t, anchors, 1.0)
            loss = loss + s.la_strength * F.mse_loss(after.float(), before.float())
        adapter.multiplier = 0.0
        self.last_step = {"ddim_index": index, "timestep": int(t), "latent_size": [h, w]}
        return {self.name: loss}


# -- facilitated transport (infer_spm.py) ------------------------------------------------------
def content_tokens(tokenizer, text: str) -> list[int]:
    """The text's token ids without the tokenizer's special tokens, each once."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    special = set(tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values())))
    return sorted({i for i in ids if i not in special})


def matching_scores(prompt_states, prompt_tokens, target_states, target_tokens, metric: str):
    """infer_spm.py `calculate_matching_score`: the cosine of the flattened text states (all
    positions, padding included) and the share of the target's tokens in the prompt; the max of
    those `metric` names."""
    import torch

    scores = []
    if "clipcos" in metric:
        scores.append(
            torch.nn.functional.cosine_similarity(
                prompt_states.flatten(1).float(), target_states.flatten(1).float(), dim=1
            )
        )
    if "tokenuni" in metric:
        wanted = set(int(i) for i in target_tokens)
        share = [len(wanted & set(tokens)) / max(len(wanted), 1) for tokens in prompt_tokens]
        scores.append(torch.tensor(share, dtype=torch.float32))
    return torch.stack(scores).max(dim=0).values


class Transport(Sampling):
    """The adapter scaled per prompt by its matching score: the delta's merged adapter (m = 1)
    is corrected by (m' - 1) times the adapter, m' = m or m^2 (`transport_power`)."""

    def __init__(self, settings, delta: str):
        from safetensors import safe_open

        self.settings, self.delta = settings, delta
        with safe_open(delta, "pt") as handle:  # the sampler loaded the merged weights already
            self.tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(PREFIX)}
        missing = [k for k in (SCORER_EMBEDDING, SCORER_TOKENS) if k not in self.tensors]
        if missing:
            raise ValueError(
                f"{delta}: an SPM delta without its transport scorer ({', '.join(missing)}): "
                "rebuild it with the erase rule (snakemake --forcerun <that delta>)"
            )
        self.adapter = None

    def pipeline(self, pipe):
        from ..deltas import delta_record

        record = delta_record(self.delta).get("adapter", {})
        self.adapter = Adapter(pipe.unet, record.get("rank", self.settings.rank),
                               record.get("alpha", self.settings.alpha))  # fmt: skip
        self.adapter.to(pipe.unet.device)
        self.adapter.load(self.tensors)
        self.adapter.attach()
        return pipe

    def multipliers(self, pipe, prompts: list[str]):
        from ..modeling import encode_prompts

        states = encode_prompts(pipe, prompts)
        tokens = [content_tokens(pipe.tokenizer, p) for p in prompts]
        target = self.tensors[SCORER_EMBEDDING].to(states)
        return matching_scores(states, tokens, target, self.tensors[SCORER_TOKENS],
                               self.settings.transport)  # fmt: skip

    def export_caveat(self) -> str:
        return (
            "no transport: this pipeline holds SPM's adapter merged at multiplier 1 for every "
            "prompt; the workflow's own images scale it per prompt (infer_spm.py's facilitated "
            "transport) from the adapter and scorer tensors under 'adapter.' in the delta "
            f"{self.delta} (crce.methods.spm.Transport)"
        )

    @contextlib.contextmanager
    def batch(self, pipe, prompts: list[str]):
        m = self.multipliers(pipe, prompts) ** self.settings.transport_power
        log.info("transport: multipliers %.3f..%.3f, %d of %d prompts below 1",
                 float(m.min()), float(m.max()), int((m < 1).sum()), len(m))  # fmt: skip
        self.adapter.multiplier = m - 1.0  # the merged weights already add the adapter once
        try:
            yield
        finally:
            self.adapter.multiplier = 0.0
