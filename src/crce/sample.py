"""Evaluation sampling: 31 prompts x N images per concept and method, batched and resumable.

Each (prompt, image index) has one seed, the same for every method, so each erased image has
a paired baseline image from the same initial noise. Images are written atomically one by one;
a retried job keeps them and samples only the missing ones. A folder whose settings changed
(another delta, model, prompt list or sampler setting) is cleared first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .deltas import unet_tensors
from .digests import files_sha256
from .files import damaged, rebuild_hint, record_sources
from .lists import Split
from .manifests import image_sha256
from .modeling import device_for, load_pipeline, torch_dtype
from .references import LATENTS, MASKS, PARAMS, reference_key, resolved_prompts
from .seeds import derive_seed
from .settings import RobustnessSettings, SampleRuntime, SampleSettings

log = logging.getLogger(__name__)

RECORD = "sampling.json"  # beside the manifest: model, delta, settings, the scheduler used
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
}


def set_scheduler(pipe, name: str) -> dict:
    """Swap in the sampler `name`, built from the model's own scheduler config (SD v1.4 ships
    PNDM; the official code samples with DDIM); returns its class and config."""
    if name != "model":
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[name])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    return {"class": type(pipe.scheduler).__name__, "config": config}


def image_seed(base_seed: int, concept_id: str, prompt: str, image_index: int) -> int:
    """One seed per (prompt, image index), independent of the method: paired images."""
    return derive_seed("crce-image", base_seed, concept_id, prompt, image_index)


def plan_images(split: Split, *, method: str, seed: int, images_per_prompt: int) -> pd.DataFrame:
    rows = []
    for prompt_index, (group, prompt) in enumerate(split.prompts()):
        for image_index in range(images_per_prompt):
            rows.append(
                {
                    "method": method,
                    "concept": split.id,
                    "concept_text": split.concept,
                    "category": split.category,
                    "group": group,
                    "prompt_index": prompt_index,
                    "prompt": prompt,
                    "image_index": image_index,
                    "seed": image_seed(seed, split.id, prompt, image_index),
                    "path": f"{prompt_index:02d}-{group}/{image_index:04d}.png",
                }
            )
    return pd.DataFrame(rows)


def _prepare_folder(folder: Path, fingerprint: dict) -> None:
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples are lists)
    marker = folder / RECORD
    if marker.exists() and json.loads(marker.read_text()) == fingerprint:
        return  # a retry of the same job: keep what was written
    if folder.exists():
        log.info("clearing %s (new run or changed settings)", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    marker.write_text(json.dumps(fingerprint, indent=2))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray((array * 255).round().astype("uint8")).save(tmp)
    tmp.replace(path)  # a half-written image never counts as done


def load_erased_pipeline(pretrained: str, delta: str | None, *, dtype, device):
    from safetensors.torch import load_file

    pipe = load_pipeline(pretrained, dtype=dtype, device=device)
    if delta:
        try:
            tensors = load_file(delta)
        except Exception as err:  # safetensors raises SafetensorError, OSError, ...
            raise damaged(delta, err, rebuild_hint(delta)) from None
        result = pipe.unet.load_state_dict(unet_tensors(tensors, pipe.unet), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{delta}: tensors not in the UNet: {result.unexpected_keys[:5]}")
    return pipe


def method_sampling_of(sampling: dict | None, delta: str | None):
    """A method's crce.methods.Sampling from its sampling params (None: none)."""
    if not sampling:
        return None
    from . import methods as registry
    from .lists import read_split

    cls, settings = registry.parse(sampling["settings"])
    split = read_split(sampling["split"]) if sampling.get("split") else None
    return cls.sampling(settings, delta, sampling["concept"], split)


def sample_images(
    pipe,
    plan: pd.DataFrame,
    folder: Path,
    *,
    steps: int,
    guidance: float,
    resolution: int,
    batch_size: int,
    sampling=None,
    progress: bool = True,
) -> dict:
    """Sample the images of `plan` that `folder` lacks; `sampling` (a method's
    crce.methods.Sampling) adds its call arguments and wraps every batch."""
    from .methods import Sampling

    sampling = sampling or Sampling()
    todo = plan[[not (folder / p).exists() for p in plan["path"]]]
    log.info("%d of %d images to sample (%d kept)", len(todo), len(plan), len(plan) - len(todo))
    started = time.perf_counter()
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, disable=not progress, unit="batch"):
        batch = todo.iloc[start : start + batch_size]
        # CPU generators: the same initial noise on any device.
        generators = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
        prompts = list(batch["prompt"])
        with sampling.batch(pipe, prompts):
            images = pipe(
                prompt=prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="np",
                **sampling.call_kwargs(),
            ).images
        for array, relative in zip(images, batch["path"], strict=True):
            _save_png(array, folder / relative)
    elapsed = time.perf_counter() - started
    return {"sampled": len(todo), "seconds": elapsed}


def draw(
    plan: pd.DataFrame,
    manifest: str | Path,
    *,
    settings: SampleSettings,
    runtime: SampleRuntime,
    model: str,
    delta: str | None,
    sampling: dict | None = None,
) -> pd.DataFrame:
    """Sample every image of `plan` beside `manifest` (resumable; a folder made with other
    settings is cleared first), then write the manifest with absolute paths. `sampling`: what a
    method changes at sampling time (crce.study.Study.sampling's params)."""
    folder = Path(manifest).parent
    fingerprint = {
        "model": model,
        "delta_sha256": files_sha256([delta]) if delta else None,
        "settings": settings.as_params(),
        "plan_sha256": hashlib.sha256(
            plan[["prompt", "seed", "path"]].to_json().encode()
        ).hexdigest(),
    }
    device = device_for(runtime.device)
    dtype = torch_dtype(settings.precision) if device.type == "cuda" else torch.float32
    pipe = load_erased_pipeline(model, delta, dtype=dtype, device=device)
    method_sampling = method_sampling_of(sampling, delta)
    if method_sampling:
        pipe = method_sampling.pipeline(pipe)
        fingerprint["sampling"] = sampling
    fingerprint["scheduler"] = set_scheduler(pipe, settings.scheduler)
    _prepare_folder(folder, fingerprint)
    stats = sample_images(
        pipe,
        plan,
        folder,
        steps=settings.steps,
        guidance=settings.guidance,
        resolution=settings.resolution,
        batch_size=runtime.batch_size,
        sampling=method_sampling,
    )
    paths = [str(folder / p) for p in plan["path"]]
    plan = plan.assign(path=paths, image_sha256=[image_sha256(p) for p in paths])
    plan.to_parquet(manifest, index=False)
    record_sources(manifest, delta)  # which delta these images are of (common.smk checks)
    if stats["sampled"]:
        log.info(
            "%d images in %.1f s (%.2f images/s)",
            stats["sampled"],
            stats["seconds"],
            stats["sampled"] / stats["seconds"],
        )
    return plan


def run(
    *,
    split_path: str,
    method: str,
    settings: SampleSettings,
    runtime: SampleRuntime,
    model: str,
    seed: int,
    delta: str | None,
    manifest: str,
    sampling: dict | None = None,
) -> None:
    """The `sample` rule: Table 1's 31 prompts x images_per_prompt."""
    from .lists import read_split

    split = read_split(split_path)
    plan = plan_images(
        split, method=method, seed=seed, images_per_prompt=settings.images_per_prompt
    )
    draw(plan, manifest, settings=settings, runtime=runtime, model=model, delta=delta,
         sampling=sampling)  # fmt: skip


# -- beyond Table 1: neutral prompts (quality) and robustness prompts ----------------------
def plan_neutral(
    prompts: pd.DataFrame, *, method: str, concept: str, per_concept: int, seed: int
) -> pd.DataFrame:
    """The concept's fixed-seed share of the neutral prompts (the same for every method, so
    each image has its SD twin), one image each (`QualitySettings.neutral_params`)."""
    column = "prompt" if "prompt" in prompts.columns else "caption"
    rng = np.random.default_rng(derive_seed("crce-neutral", seed, concept) % 2**32)
    chosen = np.sort(rng.choice(len(prompts), size=min(per_concept, len(prompts)), replace=False))
    rows = [
        {
            "method": method,
            "concept": concept,
            "group": "neutral",
            "prompt_index": int(k),
            "prompt": prompts[column].iloc[k],
            "image_index": 0,
            "seed": derive_seed("crce-neutral-image", seed, concept, int(k)),
            "path": f"neutral/{int(k):06d}.png",
        }
        for k in chosen
    ]
    return pd.DataFrame(rows)


def run_neutral(*, prompts, method, concept, quality, settings, runtime, model, delta, manifest,
                sampling=None):  # fmt: skip
    """The `sample_neutral` rule: a (method, concept)'s model on its neutral prompts."""
    plan = plan_neutral(pd.read_csv(prompts), method=method, concept=concept, **quality)
    draw(plan, manifest, settings=SampleSettings(**settings), runtime=SampleRuntime(**runtime),
         model=model, delta=delta, sampling=sampling)  # fmt: skip


def plan_prompt_items(prompts: dict, *, method: str, category: str, images: int,
                      seed_of) -> pd.DataFrame:  # fmt: skip
    """One row per (item, image) of a prompts file (`{"id", "concept", "prompts": [{"text",
    "kind", ...}]}`), the image's seed `seed_of(item, image_index)`."""
    rows = []
    for k, item in enumerate(prompts["prompts"]):
        for image_index in range(images):
            rows.append({
                "method": method, "concept": prompts["id"], "concept_text": prompts["concept"],
                "category": category, "group": item["kind"], "prompt_index": k,
                "prompt": item["text"], "image_index": image_index,
                "seed": seed_of(item, image_index),
                "path": f"{k:03d}-{item['kind']}/{image_index:04d}.png",
            })  # fmt: skip
    return pd.DataFrame(rows)


def plan_robust(
    prompts: dict, *, method: str, category: str, seed: int, images: int
) -> pd.DataFrame:
    return plan_prompt_items(
        prompts, method=method, category=category, images=images,
        seed_of=lambda item, i: derive_seed("crce-robust", seed, prompts["id"], item["text"], i),
    )  # fmt: skip


def run_robust(
    *, prompts, method, category, seed, settings, sample, runtime, model, delta, manifest,
    sampling=None,
):  # fmt: skip
    robust = RobustnessSettings(**settings)
    plan = plan_robust(json.loads(Path(prompts).read_text()), method=method, category=category,
                       seed=seed, images=robust.images_per_prompt)  # fmt: skip
    draw(plan, manifest, settings=SampleSettings(**sample), runtime=SampleRuntime(**runtime),
         model=model, delta=delta, sampling=sampling)  # fmt: skip


def plan_attack(
    prompts: dict, *, method: str, category: str, seed: int, images: int
) -> pd.DataFrame:
    """An attack's prompts, each drawn at its base prompt's Table 1 seeds (image i of an
    attack prompt and image i of its base prompt share a seed: pre-ASR pairs them)."""
    return plan_prompt_items(
        prompts, method=method, category=category, images=images,
        seed_of=lambda item, i: image_seed(seed, prompts["id"], item["base_prompt"], i),
    )  # fmt: skip


def run_attack_images(
    *, prompts, method, category, seed, images, sample, runtime, model, delta, manifest,
    sampling=None,
):  # fmt: skip
    """The `sample_attack` rule: a prompt attack's prompts drawn by one method."""
    plan = plan_attack(json.loads(Path(prompts).read_text()), method=method, category=category,
                       seed=seed, images=images)  # fmt: skip
    draw(plan, manifest, settings=SampleSettings(**sample), runtime=SampleRuntime(**runtime),
         model=model, delta=delta, sampling=sampling)  # fmt: skip


# -- images a method trains on (rule reference_images, crce.references) ---------------------
ENCODE_BATCH = 16


def plan_references(params: dict, key: str | None = None):
    """One row per image: its prompt, its seed (from the set's seed, the prompt and the image
    index: a set drawn again, or by another study, has the same images) and its file."""
    rows, key = [], key or reference_key(params)
    for k, prompt in enumerate(params["prompts"]):
        for i in range(params["images_per_prompt"]):
            rows.append({
                "method": "reference", "concept": key, "group": "reference",
                "prompt_index": k, "prompt": prompt, "image_index": i,
                "seed": derive_seed("crce-reference", params["seed"], prompt, i),
                "path": f"{k:03d}/{i:04d}.png",
            })  # fmt: skip
    return pd.DataFrame(rows)


def encode_images(vae, paths: list[str], seed: int):
    """VAE latents of the saved images, scaled as the UNet reads them: `latent_dist.sample()
    * scaling_factor`, as the fine-tuning baselines encode their training images (e.g. CA's
    train.py), with a seeded generator so a set has one tensor."""
    generator = torch.Generator().manual_seed(derive_seed("crce-reference-latents", seed))
    device, dtype = vae.device, vae.dtype
    chunks = []
    for start in range(0, len(paths), ENCODE_BATCH):
        arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in
                  paths[start : start + ENCODE_BATCH]]  # fmt: skip
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device, dtype)).latent_dist
            chunks.append(posterior.sample(generator=generator).float().cpu())
    return torch.cat(chunks) * vae.config.scaling_factor


def run_references(*, params: dict, runtime: dict, manifest: str, latents: str,
                   split: str | None = None, anchor: str | None = None) -> None:  # fmt: skip
    """The `reference_images` rule: draw the set (resumable, as every sample job), then
    write its latents (and its params, prompts resolved from `split` where they come from
    one)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    key = reference_key(params)
    params = resolved_prompts(params, split, anchor)

    settings = SampleSettings(
        images_per_prompt=params["images_per_prompt"], steps=params["steps"],
        guidance=params["guidance"], resolution=params["resolution"],
        precision=params["precision"], scheduler=params["scheduler"],
    )  # fmt: skip
    runtime = SampleRuntime(**runtime)
    plan = draw(plan_references(params, key), manifest, settings=settings, runtime=runtime,
                model=params["model"], delta=None)  # fmt: skip
    vae = AutoencoderKL.from_pretrained(params["model"], subfolder="vae")
    vae.to(device_for(runtime.device))
    encoded = encode_images(vae, list(plan["path"]), params["seed"])
    tensors = {LATENTS: encoded.contiguous()}
    metadata = {"key": key, PARAMS: json.dumps(params)}
    if params.get("masks"):
        from .masks import segment_images

        masks, whole = segment_images(params["masks"], list(plan["path"]),
                                      device_for(runtime.device))  # fmt: skip
        tensors[MASKS] = torch.from_numpy(masks).contiguous()
        metadata["masked_whole"] = str(whole)
    tmp = Path(latents).with_suffix(".tmp")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(latents)
    log.info("%d reference images of %d prompts, latents %s", len(plan),
             len(params["prompts"]), tuple(encoded.shape))  # fmt: skip
