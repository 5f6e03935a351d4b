"""The erasure engine: model calls, optimiser and checkpoints for every iterative method;
what each method minimises is its objective (crce.training.plan for the ESD family).

Speed and memory: one UNet in memory; the frozen model is the same UNet computing with the
base tensors; an objective batches its frozen predictions into one UNet call and its
trainable ones into another; prompts are encoded once; optional bf16 autocast keeps fp32
masters. Several methods of one concept can train at once (a group, when their
`group_key`s agree): each slice of a batch is computed with its own method's trained tensors
(crce.training.copies).

Randomness: iteration k draws from a generator seeded with derive_seed("crce-train", seed, k)
(`generator`), where `seed` derives from (study seed, concept) only: every method of a
concept sees the same draws at iteration k (paired training noise), then its own. A run
needs no RNG state beyond its iteration counter, and a resumed run draws exactly what it
would have.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..constants import TRAINER_VERSION
from ..files import damaged
from ..modeling import encode_prompts
from ..seeds import derive_seed
from ..settings import TrainRuntime
from . import TrainingError
from .copies import LinearCopies, SwapCopies

log = logging.getLogger(__name__)

__all__ = ["Engine", "Prompts", "TrainingError"]


class Prompts:
    """Text conditioning of a run, encoded once: the empty prompt, the target, and every text
    any method of the run conditions on."""

    def __init__(self, encode, target: str, texts: list[str]):
        unique = list(dict.fromkeys(texts))
        embeddings = encode(["", target, *unique])
        self.uncond, self.target = embeddings[0:1], embeddings[1:2]
        self._row = {text: 2 + k for k, text in enumerate(unique)}
        self._embeddings = embeddings

    def of(self, texts: list[str]) -> torch.Tensor:
        return self._embeddings[[self._row[t] for t in texts]]


class Engine:
    """Fine-tunes the UNet of `pipe` for one method or a group of methods at once
    (`methods`: name -> an IterativeMethod of one concept)."""

    def __init__(self, pipe, methods: dict, *, seed: int, runtime: TrainRuntime | None = None,
                 references: dict | None = None):  # fmt: skip
        if not methods:
            raise TrainingError("no method to train")
        self.names = list(methods)
        self.methods = methods
        self.settings = {m: method.settings for m, method in methods.items()}
        self.runtime = runtime = runtime or TrainRuntime()
        first = next(iter(methods.values()))
        if len(methods) > 1:
            keys = {type(m).group_key(m.settings) for m in methods.values()}
            if len(keys) > 1 or None in keys:
                raise TrainingError(
                    f"methods {', '.join(self.names)} cannot train as one group: they differ "
                    "in what one batched run shares (their group_key)"
                )
        self.shared = s = first.settings
        self.seed = seed
        self.pipe = pipe
        self.references = references or {}
        self.unet = pipe.unet
        self.device = self.unet.device
        self.autocast = s.precision == "bfloat16" and self.device.type == "cuda"
        if s.precision == "bfloat16" and not self.autocast:
            log.warning("bfloat16 requested on %s: training in float32", self.device.type)

        self.unet.requires_grad_(False)
        names = first.trainable(self.unet)
        if any(m.trainable(self.unet) != names for m in methods.values()):
            raise TrainingError(f"methods {', '.join(self.names)} train different tensors")
        if len(methods) == 1:
            self.copies = SwapCopies(self.unet, names)
        else:
            self.copies = LinearCopies(self.unet, names, len(methods))
        self.trained = dict(zip(self.names, self.copies.trained, strict=True))
        if runtime.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.forward = torch.compile(self.unet) if runtime.compile else self.unet
        # Latents and losses in fp32 (or the model's wider dtype: fp64 in exactness tests).
        self.dtype = torch.promote_types(self.unet.dtype, torch.float32)
        channels = self.unet.config.in_channels
        size = self.unet.config.sample_size
        self.latent_shape = (1, channels, size, size)

        self.objective = type(first).objective(self, methods)
        texts = [t for method in methods.values() for t in method.texts()]
        self.prompts = Prompts(lambda p: encode_prompts(pipe, p), first.target, texts)
        for method in methods.values():
            method.prepare(self)
        self.extra = {m: dict(method.extra_parameters(self)) for m, method in methods.items()}
        if not names and not any(self.extra.values()):  # an adapter trains its own tensors
            raise TrainingError(f"{self.names[0]}: its trainable set selects no UNet tensor")
        optimizer = getattr(torch.optim, first.optimizer)
        self.optimizer = optimizer(
            [
                {
                    "params": [*self.trained[m].values(), *self.extra[m].values()],
                    **methods[m].optimizer_kwargs(),
                }
                for m in self.names
            ]
        )
        any_tensors = self.trained[self.names[0]]
        log.info(
            "%d method(s), %d trained tensors each (%d parameters): %s ...",
            len(methods),
            len(any_tensors),
            sum(p.numel() for p in any_tensors.values()),
            ", ".join(list(any_tensors)[:4]),
        )

    @classmethod
    def from_settings(cls, pipe, settings: dict, *, target: str, split, seed: int,
                      runtime: TrainRuntime | None = None, references: dict | None = None):  # fmt: skip
        """An engine for methods given by their settings (`{name: params dict or settings}`),
        each built through the registry (crce.methods) for the concept `target`."""
        from .. import methods as registry

        built = {}
        for name, given in settings.items():
            params = given.as_params() if hasattr(given, "as_params") else dict(given)
            method_cls, parsed = registry.parse(params)
            built[name] = method_cls(parsed, target=target, split=split, seed=seed)
        return cls(pipe, built, seed=seed, runtime=runtime, references=references)

    # -- what objectives call ------------------------------------------------------------
    def generator(self, iteration: int) -> torch.Generator:
        """Iteration k's randomness, the same for every method of the concept."""
        return torch.Generator().manual_seed(derive_seed("crce-train", self.seed, iteration))

    def predict(self, latents, timestep, context, slices=None, **kwargs):
        """The UNet's prediction. slices None: the frozen model; else slice k of the batch
        runs method k's trained tensors (a single method: `[len(batch)]`)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.copies(self.forward, latents, timestep, context, slices, **kwargs)

    # -- the loop ------------------------------------------------------------------------
    def losses(self, iteration: int) -> dict[str, torch.Tensor]:
        return self.objective.losses(iteration)

    def step(self, iteration: int) -> dict[str, float]:
        """One optimiser step for every method; each method's loss reaches only its tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        for group, method in zip(self.optimizer.param_groups, self.methods.values(), strict=True):
            group["lr"] = method.optimizer_kwargs()["lr"] * method.lr_factor(iteration)
        losses = self.losses(iteration)
        for method, loss in losses.items():
            if not torch.isfinite(loss):
                raise TrainingError(f"{method}: loss is {loss.item()} at iteration {iteration}")
        sum(losses.values()).backward()
        for group, method in zip(self.optimizer.param_groups, self.methods.values(), strict=True):
            if (limit := method.max_grad_norm()) is not None:
                torch.nn.utils.clip_grad_norm_(group["params"], limit)
        self.optimizer.step()
        return {method: loss.item() for method, loss in losses.items()}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each method's trained tensors, with the UNet's own (diffusers) names."""
        return {
            method: {name: p.detach().float().cpu().contiguous() for name, p in tensors.items()}
            for method, tensors in self.trained.items()
        }

    def deltas(self) -> dict[str, dict[str, torch.Tensor]]:
        """What each method's delta keeps of its trained tensors (`IterativeMethod.delta`)."""
        return {m: self.methods[m].delta(t) for m, t in self.tensors().items()}

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
            "trained": self.tensors(),
            "optimizer": self.optimizer.state_dict(),
            "fingerprint": self._fingerprint(),
        }
        if any(self.extra.values()):
            state["extra"] = {
                m: {k: p.detach().cpu() for k, p in extra.items()}
                for m, extra in self.extra.items()
            }
        tmp = folder / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "checkpoint.pt")

    def load_checkpoint(self, folder: Path) -> tuple[int, dict]:
        path = folder / "checkpoint.pt"
        empty = {m: [] for m in self.names}
        if not path.exists():
            return 0, empty
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:  # a truncated or overwritten file: pickle, zip, EOF errors
            raise damaged(path, err, f"delete {folder} to start this training over") from None
        if state.get("fingerprint") != self._fingerprint():
            log.warning("checkpoint %s was made with other settings: starting over", path)
            return 0, empty
        with torch.no_grad():
            for method, tensors in state["trained"].items():
                for name, tensor in tensors.items():
                    self.trained[method][name].copy_(tensor)
            for method, tensors in state.get("extra", {}).items():
                for name, tensor in tensors.items():
                    self.extra[method][name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        log.info("resuming from %s at iteration %d", path, state["iteration"])
        return state["iteration"], state["history"]

    def train(self, checkpoint_dir: str | Path | None = None, progress: bool = True,
              on_iteration=None) -> dict[str, dict]:  # fmt: skip
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
                history[method].append({**self.objective.last_step, "loss": loss})
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
