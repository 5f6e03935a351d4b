"""The erasure engine: model calls, optimiser and checkpoints for every iterative strategy
(ESD-x, CRCE, CRCE-Fixed, CRCE-Sphere, RealEra; what each trains on is in crce.strategies).

Speed and memory: one UNet in memory; the frozen model is the same UNet computing with the
base tensors; all frozen predictions of an iteration run in one batched UNet call and all
trainable ones in another; prompts are encoded once; optional bf16 autocast keeps fp32 masters.
Several methods of one concept can train at once (a group): they draw the same DDIM index and
x_T noise at every iteration, so one batch carries all of them, each slice computed with its
own method's trained tensors (`_LinearCopies`).

Randomness: iteration k draws from a generator seeded with derive_seed("crce-train", seed, k),
where `seed` derives from (study seed, concept) only: every method of a concept sees the same
DDIM index i ~ U{1..ddim_steps-2} (the official `randint(1, nsteps - 1)`) and the same x_T
noise at iteration k (paired training noise), then its strategy's own draws. A run needs no
RNG state beyond its iteration counter, and a resumed run draws exactly what it would have.

Timestep: after i of the ddim_steps DDIM steps, x_t sits at the noise level of the i-th
DDIM timestep; every prediction on it is made at the official code's
`timesteps[int(i / ddim_steps * 1000)]` of the same DDIM scheduler set to 1000 steps (an
index into the descending 1000-step schedule: 1000 - 20 i for SD v1.4 at DDIM 50, one stride
from x_t's 981 - 20 i), derived from the scheduler, not from a formula.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .losses import erasure_loss, esd_anchor
from .modeling import PARAM_SETS, device_for, encode_prompts, load_pipeline
from .settings import (
    GROUP_KEYS,
    TRAINER_VERSION,
    TrainRuntime,
    TrainSettings,
    UceSettings,
    derive_seed,
    group_key,
    is_iterative,
    parse_method,
)
from .strategies import STRATEGIES, Prompts, TrainingError

log = logging.getLogger(__name__)

__all__ = ["Eraser", "TrainingError", "run"]


def master(tensor: torch.Tensor) -> torch.Tensor:
    """A trained tensor's master copy: fp32, or the model's own dtype when wider (fp64)."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32)).clone()


class _SwapCopies:
    """One method, any parameter set: the UNet holds the fp32 trained tensors; frozen calls
    swap in a copy of the base tensors functionally (no second UNet)."""

    def __init__(self, unet, names: list[str]):
        parameters = dict(unet.named_parameters())
        for name in names:
            parameters[name].data = master(parameters[name].data)
            parameters[name].requires_grad_(True)
        self.trained = [{name: parameters[name] for name in names}]
        self.frozen = {name: parameters[name].detach().clone() for name in names}

    def __call__(self, forward, latents, timestep, context, slices):
        if slices is None:
            return torch.func.functional_call(
                forward,
                self.frozen,
                (latents, timestep),
                {"encoder_hidden_states": context},
                strict=False,
            ).sample
        return forward(latents, timestep, encoder_hidden_states=context).sample


class _MultiLinear(torch.nn.Module):
    """A Linear with one trainable copy of its selected tensors per method: batch slice k is
    computed with copy k; outside a routed call the base tensors serve (the frozen model)."""

    def __init__(self, base: torch.nn.Linear, trained: list[str], copies: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.trained = trained  # "weight" and/or "bias"
        self.copies = torch.nn.ModuleList()
        for _ in range(copies):
            copy = torch.nn.Module()
            for attr in trained:
                tensor = master(getattr(base, attr))
                copy.register_parameter(attr, torch.nn.Parameter(tensor))
            self.copies.append(copy)
        self.slices: list[int] | None = None

    def _tensors(self, k: int):
        weight = getattr(self.copies[k], "weight", None) if "weight" in self.trained else None
        bias = getattr(self.copies[k], "bias", None) if "bias" in self.trained else None
        return (self.base.weight if weight is None else weight), (
            self.base.bias if bias is None else bias
        )

    def forward(self, x):
        if self.slices is None:
            return F.linear(x, self.base.weight, self.base.bias)
        tensors = [self._tensors(k) for k in range(len(self.copies))]
        if len(set(self.slices)) == 1 and all(b is None for _, b in tensors):
            # Equal slices (the x_t rollout): one batched matmul for every method.
            weights = torch.stack([w for w, _ in tensors]).to(x.dtype)
            groups = x.reshape(len(tensors), -1, x.shape[-1])
            return torch.bmm(groups, weights.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        parts = x.split(self.slices)
        return torch.cat([F.linear(p, w, b) for p, (w, b) in zip(parts, tensors, strict=True)])


class _LinearCopies:
    """Several methods over Linear layers (every attn2 set): each selected Linear becomes a
    `_MultiLinear`, so one UNet call computes every method's slice with its own tensors."""

    def __init__(self, unet, names: list[str], copies: int):
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in names:
            module, attr = name.rsplit(".", 1)
            by_module[module].append(attr)
        self.layers: list[_MultiLinear] = []
        self.trained: list[dict[str, torch.nn.Parameter]] = [{} for _ in range(copies)]
        for path, attrs in by_module.items():
            base = unet.get_submodule(path)
            if type(base) is not torch.nn.Linear:
                raise TrainingError(
                    f"grouped training needs Linear layers; {path} is {type(base).__name__} "
                    "(train this parameter set one method at a time)"
                )
            layer = _MultiLinear(base, attrs, copies)
            unet.set_submodule(path, layer)
            self.layers.append(layer)
            for k, copy in enumerate(layer.copies):
                for attr in attrs:
                    self.trained[k][f"{path}.{attr}"] = getattr(copy, attr)

    def __call__(self, forward, latents, timestep, context, slices):
        for layer in self.layers:
            layer.slices = slices
        try:
            return forward(latents, timestep, encoder_hidden_states=context).sample
        finally:
            for layer in self.layers:
                layer.slices = None


class Eraser:
    """Fine-tunes the UNet of `pipe` so the target (and its corefs) stop appearing, for one
    method or for a group of methods at once (`methods`: name -> settings)."""

    def __init__(
        self,
        pipe,
        methods: dict[str, TrainSettings],
        target: str,
        split=None,
        *,
        seed: int,
        runtime: TrainRuntime | None = None,
    ):
        if not methods:
            raise TrainingError("no method to train")
        self.names = list(methods)
        self.settings = methods
        self.runtime = runtime = runtime or TrainRuntime()
        keys = {group_key(s) for s in methods.values()}
        if len(keys) > 1:
            raise TrainingError(
                f"methods {', '.join(self.names)} differ in {'/'.join(GROUP_KEYS)}: "
                "they cannot train as one group"
            )
        self.shared = s = next(iter(methods.values()))
        self.seed = seed
        self.unet = pipe.unet
        self.device = self.unet.device
        self.autocast = s.precision == "bfloat16" and self.device.type == "cuda"
        if s.precision == "bfloat16" and not self.autocast:
            log.warning("bfloat16 requested on %s: training in float32", self.device.type)

        select = PARAM_SETS[s.params]
        self.unet.requires_grad_(False)
        names = [name for name, _ in self.unet.named_parameters() if select(name)]
        if not names:
            raise TrainingError(f"parameter set {s.params!r} selects no UNet tensor")
        if len(methods) == 1:
            self.copies = _SwapCopies(self.unet, names)
        else:
            self.copies = _LinearCopies(self.unet, names, len(methods))
        self.trained = dict(zip(self.names, self.copies.trained, strict=True))
        if runtime.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.forward = torch.compile(self.unet) if runtime.compile else self.unet
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.trained[m].values()), "lr": methods[m].lr} for m in self.names]
        )

        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(s.ddim_steps)
        # The schedule every loss prediction indexes into (official: set_timesteps(1000)).
        self.loss_schedule = DDIMScheduler.from_config(pipe.scheduler.config)
        self.loss_schedule.set_timesteps(self.loss_schedule.config.num_train_timesteps)

        self.strategies = {
            m: STRATEGIES[settings.strategy](settings, target, split, seed)
            for m, settings in methods.items()
        }
        texts = [t for strategy in self.strategies.values() for t in strategy.texts()]
        self.prompts = Prompts(lambda p: encode_prompts(pipe, p), target, texts)
        for strategy in self.strategies.values():
            strategy.prepare(self.prompts, self.device)
        self.uncond, self.target = self.prompts.uncond, self.prompts.target
        # Latents and losses in fp32 (or the model's wider dtype: fp64 in exactness tests).
        self.dtype = torch.promote_types(self.unet.dtype, torch.float32)
        channels = self.unet.config.in_channels
        size = self.unet.config.sample_size
        self.latent_shape = (1, channels, size, size)

    # -- randomness protocol -------------------------------------------------------------
    def draw(self, iteration: int) -> tuple[int, torch.Tensor, dict]:
        """The DDIM index and x_T noise every method shares, then each method's plan."""
        plans, shared = {}, None
        for method, strategy in self.strategies.items():
            # One generator per method, all seeded alike: each method draws what its own
            # run would (grouped == separate), and i and x_T agree across the group.
            generator = torch.Generator().manual_seed(
                derive_seed("crce-train", self.seed, iteration)
            )
            ddim_index = int(
                torch.randint(1, self.shared.ddim_steps - 1, (1,), generator=generator)
            )
            noise = torch.randn(self.latent_shape, generator=generator)
            shared = shared or (ddim_index, noise.to(self.device, self.dtype))
            plans[method] = strategy.plan(iteration, generator)
        return shared[0], shared[1], plans

    # -- model calls ---------------------------------------------------------------------
    def _unet(self, latents, timestep, context, slices=None):
        """slices None: the frozen model; else slice k of the batch runs method k."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.copies(self.forward, latents, timestep, context, slices)

    @torch.no_grad()
    def sample_xt(self, ddim_index: int, noise: torch.Tensor) -> torch.Tensor:
        """DDIM rollout from x_T for `ddim_index` steps, conditioned on the target (CFG), one
        latent per method (all alike when x_t comes from the frozen model)."""
        s = self.shared
        groups = 1 if s.xt_model == "frozen" else len(self.names)
        latents = (noise * self.scheduler.init_noise_sigma).expand(groups, -1, -1, -1)
        context = torch.cat([self.uncond, self.target] * groups)
        slices = None if s.xt_model == "frozen" else [2] * groups
        for timestep in self.scheduler.timesteps[:ddim_index]:
            pairs = self._unet(latents.repeat_interleave(2, dim=0), timestep, context, slices)
            e_uncond, e_cond = pairs[0::2], pairs[1::2]
            guided = e_uncond + s.start_guidance * (e_cond - e_uncond)
            latents = self.scheduler.step(guided.to(latents.dtype), timestep, latents).prev_sample
        return latents.expand(len(self.names), -1, -1, -1)

    def unet_timestep(self, ddim_index: int) -> torch.Tensor:
        """The UNet timestep of every loss prediction on x_t (module docstring)."""
        schedule = self.loss_schedule.timesteps
        index = int(ddim_index / self.shared.ddim_steps * len(schedule))
        return schedule[index].to(self.device)

    def losses(self, iteration: int) -> dict[str, torch.Tensor]:
        ddim_index, noise, plans = self.draw(iteration)
        xt = self.sample_xt(ddim_index, noise)
        timestep = self.unet_timestep(ddim_index)
        frozen_batches, trainable_batches = [], []
        for method in self.names:
            plan = plans[method]
            self_anchor = plan.coref_anchor == "self" and len(plan.corefs) > 0
            frozen = [self.uncond, self.target]
            frozen += [plan.corefs] if self_anchor else []
            frozen_batches.append(torch.cat([*frozen, plan.retains]))
            trainable = [self.target] if plan.esd_term else []
            trainable_batches.append(torch.cat([*trainable, plan.corefs, plan.retains]))
        frozen_context = torch.cat(frozen_batches)
        frozen_sizes = [len(b) for b in frozen_batches]
        trainable_sizes = [len(b) for b in trainable_batches]
        with torch.no_grad():
            frozen_all = self._unet(
                _each_latent_per_row(xt, frozen_sizes), timestep, frozen_context
            ).to(self.dtype)
        predictions_all = self._unet(
            _each_latent_per_row(xt, trainable_sizes),
            timestep,
            torch.cat(trainable_batches),
            trainable_sizes,
        )
        frozen_parts = frozen_all.split(frozen_sizes)
        prediction_parts = predictions_all.split(trainable_sizes)
        losses = {}
        for k, method in enumerate(self.names):
            s, plan = self.settings[method], plans[method]
            frozen, predictions = frozen_parts[k], prediction_parts[k]
            m, n = len(plan.corefs), len(plan.retains)
            e_uncond, e_target = frozen[0:1], frozen[1:2]
            anchor = esd_anchor(e_uncond, e_target, s.eta)
            if plan.coref_anchor == "self" and m > 0:
                coref_anchors = esd_anchor(e_uncond, frozen[2 : 2 + m], s.eta)
            else:
                coref_anchors = anchor.expand(m, -1, -1, -1)
            offset = 1 if plan.esd_term else 0
            losses[method] = erasure_loss(
                pred_target=predictions[0:1] if plan.esd_term else None,
                anchor=anchor,
                pred_corefs=predictions[offset : offset + m],
                coref_anchors=coref_anchors,
                coref_weights=plan.coref_weights,
                pred_retains=predictions[offset + m :],
                frozen_retains=frozen[len(frozen) - n :],
                retain_weights=plan.retain_weights,
                alpha=s.alpha,
                beta=s.beta,
                reduce=plan.reduce,
            )
        self.last_step = {"ddim_index": ddim_index, "timestep": int(timestep)}
        return losses

    def step(self, iteration: int) -> dict[str, float]:
        """One optimiser step for every method; each method's loss reaches only its tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(iteration)
        for method, loss in losses.items():
            if not torch.isfinite(loss):
                raise TrainingError(f"{method}: loss is {loss.item()} at iteration {iteration}")
        sum(losses.values()).backward()
        self.optimizer.step()
        return {method: loss.item() for method, loss in losses.items()}

    def deltas(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each method's trained tensors, with the UNet's own (diffusers) names."""
        return {
            method: {name: p.detach().float().cpu().contiguous() for name, p in tensors.items()}
            for method, tensors in self.trained.items()
        }

    # -- checkpoints ---------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed: an older trainer's never is."""
        settings = {m: s.as_params() for m, s in self.settings.items()}
        return {"methods": settings, "seed": self.seed, "trainer_version": TRAINER_VERSION}

    def save_checkpoint(self, folder: Path, iteration: int, history: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "iteration": iteration,
            "history": history,
            "trained": self.deltas(),
            "optimizer": self.optimizer.state_dict(),
            "fingerprint": self._fingerprint(),
        }
        tmp = folder / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "checkpoint.pt")

    def load_checkpoint(self, folder: Path) -> tuple[int, dict]:
        path = folder / "checkpoint.pt"
        empty = {m: [] for m in self.names}
        if not path.exists():
            return 0, empty
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("fingerprint") != self._fingerprint():
            log.warning("checkpoint %s was made with other settings: starting over", path)
            return 0, empty
        with torch.no_grad():
            for method, tensors in state["trained"].items():
                for name, tensor in tensors.items():
                    self.trained[method][name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("resuming from %s at iteration %d", path, state["iteration"])
        return state["iteration"], state["history"]

    def train(
        self,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        on_iteration=None,
    ) -> dict[str, dict]:
        """Train to the end (resuming from `checkpoint_dir`); `on_iteration(k)` is called
        after each finished iteration (tests stop a run there)."""
        s = self.shared
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        start, history = (
            self.load_checkpoint(folder) if folder else (0, {m: [] for m in self.names})
        )
        began = time.perf_counter()
        bar = tqdm(
            range(start, s.iterations), initial=start, total=s.iterations, disable=not progress
        )
        for iteration in bar:
            try:
                losses = self.step(iteration)
            except TrainingError as err:
                kept = f"; last good checkpoint kept in {folder}" if folder else ""
                raise TrainingError(f"{err}{kept}") from err
            for method, loss in losses.items():
                history[method].append({**self.last_step, "loss": loss})
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3g}")
            done = iteration + 1
            if folder and (done % self.runtime.checkpoint_every == 0 or done == s.iterations):
                self.save_checkpoint(folder, done, history)
            if on_iteration:
                on_iteration(iteration)
        elapsed = time.perf_counter() - began
        ran = s.iterations - start
        return {
            method: {
                "iterations": s.iterations,
                "resumed_at": start,
                "wall_seconds": elapsed,
                "it_per_s": ran / elapsed if elapsed > 0 else None,
                "loss": _loss_summary([h["loss"] for h in history[method]]),
                "history": history[method],
            }
            for method in self.names
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


def save_delta(tensors: dict[str, torch.Tensor], path: str | Path, *, method: str, concept: str):
    """A delta file whose bytes depend on its contents alone: safetensors writes a metadata
    dict in hash order, so two keys would land in either order and the same tensors would
    hash differently (the sampler's fingerprint then discards finished images). One key."""
    from safetensors.torch import save_file

    metadata = {"crce": json.dumps({"concept": concept, "method": method}, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def _each_latent_per_row(xt: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Method k's x_t repeated once per row of its prompt batch, methods stacked in order."""
    return torch.cat([xt[k : k + 1].expand(n, -1, -1, -1) for k, n in enumerate(sizes)])


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
    methods: dict[str, dict],
    model: str,
    seed: int,
    runtime: dict,
    split_path: str,
    outputs: dict[str, str],
    checkpoint_dir: str,
    trainer_version: int = TRAINER_VERSION,
) -> None:
    """The `erase` rules: train one method or a group (or solve UCE, or read an external
    checkpoint), then write each method's delta.safetensors and train.json."""
    from .lists import read_split

    if trainer_version != TRAINER_VERSION:
        raise TrainingError(
            f"the workflow planned trainer version {trainer_version}, this code is version "
            f"{TRAINER_VERSION}: rerun snakemake so the job is planned with this code"
        )
    settings = {m: parse_method(spec) for m, spec in methods.items()}
    iterative = all(is_iterative(s) for s in settings.values())
    if not iterative and len(settings) > 1:
        raise TrainingError("closed-form and external methods run one per job, not in a group")
    runtime = TrainRuntime(**runtime)
    seed = derive_seed(seed, concept["id"])  # every method of the concept: paired noise
    device = device_for(runtime.device)
    torch.manual_seed(seed)
    first = next(iter(settings.values()))
    bf16 = iterative and first.precision == "bfloat16" and device.type == "cuda"
    pipe = load_pipeline(model, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
    pipe.vae = None  # erasure works in latent space
    log.info("erasing %r with %s", concept["text"], json.dumps(methods))
    split = read_split(split_path)
    began = time.perf_counter()
    if iterative:
        eraser = Eraser(pipe, settings, concept["text"], split, seed=seed, runtime=runtime)
        any_tensors = next(iter(eraser.trained.values()))
        log.info(
            "%d methods, %d trained tensors each (%d parameters): %s ...",
            len(settings),
            len(any_tensors),
            sum(p.numel() for p in any_tensors.values()),
            ", ".join(list(any_tensors)[:4]),
        )
        summaries = eraser.train(checkpoint_dir)
        deltas = eraser.deltas()
    else:
        (method,) = settings
        if isinstance(first, UceSettings):
            from .uce import edit

            deltas = {method: edit(pipe, first, concept["text"], split)}
            summaries = {method: {}}
        else:
            from .external import load_delta

            delta, record = load_delta(pipe.unet, first, concept)
            deltas, summaries = {method: delta}, {method: {"external": record}}
        summaries[method]["wall_seconds"] = time.perf_counter() - began
    provenance = {
        "trainer_version": TRAINER_VERSION,
        "device": str(device),
        "host": platform.node(),
        "versions": versions(),
    }
    for method, output in outputs.items():
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_delta(deltas[method], output, method=method, concept=concept["id"])
        summary = summaries[method]
        record = {
            "concept": concept,
            "method": method,
            "settings": methods[method],
            "model": model,
            "seed": seed,
            **provenance,
            **summary,
        }
        (output.parent / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        if "loss" in summary:
            log.info(
                "%s done: %d iterations in %.1f s (%.2f it/s), loss %.4g -> %.4g",
                method,
                summary["iterations"],
                summary["wall_seconds"],
                summary["it_per_s"] or 0,
                summary["loss"].get("first", float("nan")),
                summary["loss"].get("last", float("nan")),
            )
        else:
            log.info("%s done in %.1f s", method, summary["wall_seconds"])
