"""One trainer for every erasure strategy (ESD-x, CRCE, CRCE-Fixed, CRCE-Sphere, RealEra).

Speed and memory: one UNet in memory; the frozen model is the same module with a frozen copy
of the trained tensors swapped in functionally; all frozen predictions of an iteration run in
one batched UNet call and all trainable predictions in another; text embeddings of every
prompt are computed once; optional bf16 autocast keeps fp32 master copies of trained tensors.

Randomness protocol (the reference in tests/ repeats it): iteration k draws from a generator
seeded with `iteration_seed(seed, k)`, in this order: the DDIM step i ~ U{1..ddim_steps-1},
the x_T noise, then the coref and retain draws of the strategy. A run therefore needs no RNG
state beyond its iteration counter, and a resumed run draws exactly what it would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from .losses import erasure_loss, esd_anchor
from .modeling import device_for, encode_prompts, load_pipeline

log = logging.getLogger(__name__)

STRATEGIES = ("none", "esd", "crce", "sphere", "realera")


class TrainingError(RuntimeError):
    pass


def _is_attn2(name: str) -> bool:
    return ".attn2." in name


# Trained parameter sets, by the names of the official codes (README: "paper vs official code").
PARAM_SETS = {
    "xattn-kv": lambda n: _is_attn2(n) and (".to_k." in n or ".to_v." in n),
    "xattn-qk": lambda n: _is_attn2(n) and (".to_q." in n or ".to_k." in n),
    "xattn": lambda n: _is_attn2(n),
    "noxattn": lambda n: (
        not _is_attn2(n) and not n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))
    ),
}


@dataclass
class SphereSettings:
    radius: float = 2.0
    coref_cos_min: float = 0.5
    coref_cos_max: float = 0.9
    retain_cos_max: float = 0.5


@dataclass
class TrainSettings:
    strategy: str = "esd"
    n_corefs: int = 5
    n_retains: int = 3
    fixed: bool = False
    params: str = "xattn-kv"
    lr: float = 1e-5
    iterations: int = 500
    eta: float = 1.0
    coref_anchor: str = "target"
    xt_model: str = "trained"
    start_guidance: float = 3.0
    ddim_steps: int = 50
    alpha: float = 1.0
    beta: float = 1.0
    sphere: SphereSettings = field(default_factory=SphereSettings)
    precision: str = "float32"
    compile: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    device: str = "auto"
    seed: int = 0

    @classmethod
    def resolve(cls, train: dict, method: dict, seed: int) -> TrainSettings:
        """`train.*` defaults overridden by the method's own keys."""
        merged = {**train, **{k: v for k, v in method.items() if k != "label"}}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TrainingError(f"unknown training key(s): {', '.join(unknown)}")
        if merged.get("strategy", "esd") not in STRATEGIES:
            raise TrainingError(f"unknown strategy {merged['strategy']!r}")
        if merged.get("params", "xattn-kv") not in PARAM_SETS:
            raise TrainingError(f"unknown trained-parameter set {merged['params']!r}")
        merged["sphere"] = SphereSettings(**merged.get("sphere", {}))
        return cls(**merged, seed=seed)


def iteration_seed(seed: int, iteration: int) -> int:
    digest = hashlib.sha256(f"crce-train:{seed}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_seed(base_seed: int, method: str, concept_id: str) -> int:
    digest = hashlib.sha256(f"{base_seed}:{method}:{concept_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class Plan:
    """What one iteration trains on (drawn by the randomness protocol)."""

    ddim_index: int
    noise: torch.Tensor
    coref_embeddings: torch.Tensor
    coref_weights: torch.Tensor
    retain_embeddings: torch.Tensor
    retain_weights: torch.Tensor
    esd_term: bool = True


def sphere_neighbours(
    embedding: torch.Tensor,
    n_corefs: int,
    n_retains: int,
    sphere: SphereSettings,
    generator: torch.Generator,
    max_draws: int = 10_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RealEra-style neighbours e + r (v - e)/|v - e|, r ~ U[0, radius |e|], v - e a Gaussian
    direction; kept as corefs when cos(e, n) is in [coref_cos_min, coref_cos_max], as retains
    when cos(e, n) < retain_cos_max. The radius is relative to |e|, so one setting fits any
    text encoder."""
    flat = embedding.flatten().float()
    norm = flat.norm()
    corefs, retains = [], []
    for _ in range(max_draws):
        if len(corefs) >= n_corefs and len(retains) >= n_retains:
            break
        direction = torch.randn(flat.shape, generator=generator, dtype=torch.float32)
        direction = direction / direction.norm()
        radius = torch.rand((), generator=generator) * sphere.radius * norm
        neighbour = flat + radius * direction
        cos = torch.nn.functional.cosine_similarity(flat, neighbour, dim=0).item()
        if sphere.coref_cos_min <= cos <= sphere.coref_cos_max and len(corefs) < n_corefs:
            corefs.append(neighbour)
        elif cos < sphere.retain_cos_max and len(retains) < n_retains:
            retains.append(neighbour)
    if len(corefs) < n_corefs or len(retains) < n_retains:
        raise TrainingError(
            f"sphere sampling found {len(corefs)}/{n_corefs} corefs and {len(retains)}/{n_retains} "
            f"retains in {max_draws} draws; widen train.sphere.radius or the cosine bands"
        )
    shape = (-1, *embedding.shape)
    as_batch = lambda items: torch.stack(items).reshape(shape).to(embedding.dtype)  # noqa: E731
    return as_batch(corefs[:n_corefs]), as_batch(retains[:n_retains])


class Eraser:
    """Fine-tunes the UNet of `pipe` so the target (and its corefs) stop appearing."""

    def __init__(self, pipe, settings: TrainSettings, target: str, split=None):
        self.settings = s = settings
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = self.unet.device
        self.autocast = s.precision == "bfloat16" and self.device.type == "cuda"
        if s.precision == "bfloat16" and not self.autocast:
            log.warning("bfloat16 requested on %s: training in float32", self.device.type)
        if s.strategy == "none":
            raise TrainingError("strategy 'none' trains nothing (the SD baseline has no erase job)")

        select = PARAM_SETS[s.params]
        self.unet.requires_grad_(False)
        self.trained: dict[str, torch.nn.Parameter] = {}
        for name, param in self.unet.named_parameters():
            if select(name):
                param.data = param.data.float()  # fp32 master copy
                param.requires_grad_(True)
                self.trained[name] = param
        if not self.trained:
            raise TrainingError(f"parameter set {s.params!r} selects no UNet tensor")
        # The frozen model = the same UNet with these tensors swapped in (no second UNet).
        self.frozen = {name: p.detach().clone() for name, p in self.trained.items()}
        if s.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.forward = torch.compile(self.unet) if s.compile else self.unet
        self.optimizer = torch.optim.Adam(self.trained.values(), lr=s.lr)

        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(s.ddim_steps)
        self.train_timesteps = self.scheduler.config.num_train_timesteps

        coref_items = list(split.coref_train) if split is not None else []
        retain_items = list(split.retain_train) if split is not None else []
        if s.strategy == "crce":
            if len(coref_items) < s.n_corefs or len(retain_items) < s.n_retains:
                raise TrainingError(
                    f"{target!r}: method draws M={s.n_corefs} corefs and N={s.n_retains} retains "
                    f"per iteration, but the train split has {len(coref_items)} and "
                    f"{len(retain_items)}"
                )
        self.coref_texts = [i.text for i in coref_items] if s.strategy == "crce" else []
        self.retain_texts = [i.text for i in retain_items] if s.strategy == "crce" else []
        # Every prompt is encoded once for the whole run.
        embeddings = encode_prompts(pipe, ["", target, *self.coref_texts, *self.retain_texts])
        self.uncond, self.target = embeddings[0:1], embeddings[1:2]
        n_c = len(self.coref_texts)
        self.coref_bank = embeddings[2 : 2 + n_c]
        self.retain_bank = embeddings[2 + n_c :]
        self.coref_bank_weights = torch.tensor([i.weight for i in coref_items], device=self.device)
        self.retain_bank_weights = torch.tensor(
            [i.weight for i in retain_items], device=self.device
        )
        channels = self.unet.config.in_channels
        size = self.unet.config.sample_size
        self.latent_shape = (1, channels, size, size)
        self.fixed_draw = self._draw_lists(
            torch.Generator().manual_seed(iteration_seed(s.seed, -1))
        )

    # -- randomness protocol -------------------------------------------------------------
    def _draw_lists(self, generator: torch.Generator):
        s = self.settings
        if s.strategy != "crce":
            return None
        coref_idx = torch.randperm(len(self.coref_texts), generator=generator)[: s.n_corefs]
        retain_idx = torch.randperm(len(self.retain_texts), generator=generator)[: s.n_retains]
        return coref_idx.tolist(), retain_idx.tolist()

    def plan(self, iteration: int) -> Plan:
        s = self.settings
        generator = torch.Generator().manual_seed(iteration_seed(s.seed, iteration))
        ddim_index = int(torch.randint(1, s.ddim_steps, (1,), generator=generator))
        noise = torch.randn(self.latent_shape, generator=generator).to(self.device)
        empty = self.target[:0]
        no_weights = torch.zeros(0, device=self.device)
        plan = Plan(ddim_index, noise, empty, no_weights, empty, no_weights)
        if s.strategy == "crce":
            draw = self.fixed_draw if s.fixed else self._draw_lists(generator)
            coref_idx, retain_idx = draw
            plan.coref_embeddings = self.coref_bank[coref_idx]
            plan.coref_weights = self.coref_bank_weights[coref_idx]
            plan.retain_embeddings = self.retain_bank[retain_idx]
            plan.retain_weights = self.retain_bank_weights[retain_idx]
        elif s.strategy in ("sphere", "realera"):
            corefs, retains = sphere_neighbours(
                self.target[0].cpu(), s.n_corefs, s.n_retains, s.sphere, generator
            )
            plan.coref_embeddings = corefs.to(self.device)
            plan.retain_embeddings = retains.to(self.device)
            plan.coref_weights = torch.ones(len(corefs), device=self.device)
            plan.retain_weights = torch.ones(len(retains), device=self.device)
            # RealEra alternates: anchor (ESD) iterations and neighbour iterations.
            if s.strategy == "realera":
                if iteration % 2 == 0:
                    plan.coref_embeddings, plan.retain_embeddings = empty, empty
                    plan.coref_weights = plan.retain_weights = no_weights
                else:
                    plan.esd_term = False
        return plan

    # -- model calls ---------------------------------------------------------------------
    def _unet(self, latents, timestep, embeddings, frozen: bool):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if frozen:
                return torch.func.functional_call(
                    self.forward,
                    self.frozen,
                    (latents, timestep),
                    {"encoder_hidden_states": embeddings},
                    strict=False,
                ).sample
            return self.forward(latents, timestep, encoder_hidden_states=embeddings).sample

    @torch.no_grad()
    def sample_xt(self, plan: Plan) -> torch.Tensor:
        """DDIM rollout from x_T for `ddim_index` steps, conditioned on the target (CFG)."""
        s = self.settings
        latents = plan.noise * self.scheduler.init_noise_sigma
        context = torch.cat([self.uncond, self.target])
        frozen = s.xt_model == "frozen"
        for timestep in self.scheduler.timesteps[: plan.ddim_index]:
            e_uncond, e_cond = self._unet(
                torch.cat([latents] * 2), timestep, context, frozen
            ).chunk(2)
            guided = e_uncond + s.start_guidance * (e_cond - e_uncond)
            latents = self.scheduler.step(guided.float(), timestep, latents).prev_sample
        return latents

    def loss(self, iteration: int) -> torch.Tensor:
        s = self.settings
        plan = self.plan(iteration)
        latents = self.sample_xt(plan)
        # Official code: the 1000-step index int(i / ddim_steps * 1000).
        timestep = torch.tensor(
            int(plan.ddim_index / s.ddim_steps * self.train_timesteps), device=self.device
        )
        m, n = len(plan.coref_embeddings), len(plan.retain_embeddings)
        self_anchor = s.coref_anchor == "self" and m > 0
        frozen_context = [self.uncond, self.target]
        if self_anchor:
            frozen_context.append(plan.coref_embeddings)
        frozen_context.append(plan.retain_embeddings)
        frozen_context = torch.cat(frozen_context)
        with torch.no_grad():
            frozen = self._unet(
                latents.expand(len(frozen_context), -1, -1, -1), timestep, frozen_context, True
            ).float()
        e_uncond, e_target = frozen[0:1], frozen[1:2]
        anchor = esd_anchor(e_uncond, e_target, s.eta)
        if self_anchor:
            coref_anchors = esd_anchor(e_uncond, frozen[2 : 2 + m], s.eta)
        else:
            coref_anchors = anchor.expand(m, -1, -1, -1)
        frozen_retains = frozen[len(frozen) - n :]

        trainable_context = [self.target] if plan.esd_term else []
        trainable_context += [plan.coref_embeddings, plan.retain_embeddings]
        trainable_context = torch.cat(trainable_context)
        predictions = self._unet(
            latents.expand(len(trainable_context), -1, -1, -1), timestep, trainable_context, False
        )
        offset = 1 if plan.esd_term else 0
        return erasure_loss(
            pred_target=predictions[0:1] if plan.esd_term else None,
            anchor=anchor,
            pred_corefs=predictions[offset : offset + m],
            coref_anchors=coref_anchors,
            coref_weights=plan.coref_weights,
            pred_retains=predictions[offset + m :],
            frozen_retains=frozen_retains,
            retain_weights=plan.retain_weights,
            alpha=s.alpha,
            beta=s.beta,
        )

    def step(self, iteration: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(iteration)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()} at iteration {iteration}")
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def delta(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().contiguous() for name, p in self.trained.items()}

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, folder: Path, iteration: int, losses: list[float]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "iteration": iteration,
            "losses": losses,
            "trained": self.delta(),
            "optimizer": self.optimizer.state_dict(),
            "settings": asdict(self.settings),
        }
        tmp = folder / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "checkpoint.pt")

    def load_checkpoint(self, folder: Path) -> tuple[int, list[float]]:
        path = folder / "checkpoint.pt"
        if not path.exists():
            return 0, []
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["settings"] != asdict(self.settings):
            log.warning("checkpoint %s was made with other settings: starting over", path)
            return 0, []
        with torch.no_grad():
            for name, tensor in state["trained"].items():
                self.trained[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("resuming from %s at iteration %d", path, state["iteration"])
        return state["iteration"], state["losses"]

    def train(self, checkpoint_dir: str | Path | None = None, progress: bool = True) -> dict:
        s = self.settings
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        start, losses = self.load_checkpoint(folder) if folder else (0, [])
        fault_at = int(os.environ.get("CRCE_FAULT_AT_ITERATION", "-1"))
        began = time.perf_counter()
        bar = tqdm(
            range(start, s.iterations), initial=start, total=s.iterations, disable=not progress
        )
        for iteration in bar:
            if iteration == fault_at and folder and not (folder / "fault-injected").exists():
                (folder / "fault-injected").touch()  # fail once, as a preempted job would
                raise TrainingError(f"injected fault at iteration {iteration} (test hook)")
            try:
                losses.append(self.step(iteration))
            except TrainingError as err:
                kept = f"; last good checkpoint kept in {folder}" if folder else ""
                raise TrainingError(f"{err}{kept}") from err
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
            done = iteration + 1
            if folder and (done % s.checkpoint_every == 0 or done == s.iterations):
                self.save_checkpoint(folder, done, losses)
        elapsed = time.perf_counter() - began
        ran = s.iterations - start
        return {
            "iterations": s.iterations,
            "resumed_at": start,
            "wall_seconds": elapsed,
            "it_per_s": ran / elapsed if elapsed > 0 else None,
            "loss": _loss_summary(losses),
        }


def _loss_summary(losses: list[float]) -> dict:
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "mean_last_10pct": sum(tail) / len(tail),
        "every": losses if len(losses) <= 1000 else losses[:: math.ceil(len(losses) / 1000)],
    }


def versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {
        "crce": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run(
    *,
    concept: dict,
    method: str,
    method_spec: dict,
    config: dict,
    split_path: str,
    output: str,
    checkpoint_dir: str,
) -> None:
    """The `erase` rule: train, then write delta.safetensors and train.json beside it."""
    from safetensors.torch import save_file

    from .lists import read_split

    seed = run_seed(config["seed"], method, concept["id"])
    settings = TrainSettings.resolve(config["train"], method_spec, seed)
    device = device_for(settings.device)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if settings.precision == "bfloat16" and device.type == "cuda" else None
    pipe = load_pipeline(config["model"]["pretrained"], dtype=dtype or torch.float32, device=device)
    pipe.vae = None  # training works in latent space
    log.info("erasing %r with %s: %s", concept["text"], method, json.dumps(asdict(settings)))
    eraser = Eraser(pipe, settings, concept["text"], read_split(split_path))
    log.info(
        "%d trained tensors (%d parameters): %s ...",
        len(eraser.trained),
        sum(p.numel() for p in eraser.trained.values()),
        ", ".join(list(eraser.trained)[:4]),
    )
    summary = eraser.train(checkpoint_dir)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(eraser.delta(), str(output), metadata={"method": method, "concept": concept["id"]})
    record = {
        "concept": concept,
        "method": method,
        "settings": asdict(settings),
        "model": config["model"]["pretrained"],
        "seed": seed,
        "device": str(device),
        "host": platform.node(),
        "versions": versions(),
        **summary,
    }
    (output.parent / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "done: %d iterations in %.1f s (%.2f it/s), loss %.4g -> %.4g",
        summary["iterations"],
        summary["wall_seconds"],
        summary["it_per_s"] or 0,
        summary["loss"].get("first", float("nan")),
        summary["loss"].get("last", float("nan")),
    )
