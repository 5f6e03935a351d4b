"""Train the toy world's models with fixed seeds and save them where the demo loads them.

    python -m crce_worlds.toy.train --out resources/toy            # the shipped weights (~30 min, 2 cores)
    python -m crce_worlds.toy.train --out /tmp/toy --quick         # a shortened end-to-end run (tests)

Writes `{out}/sd` (a StableDiffusionPipeline folder: CLIP tokenizer and text encoder,
AutoencoderKL, UNet2DConditionModel with SD v1.4's block types and attn2 names, DDIM
scheduler), `{out}/judge.safetensors` + `judge.json` (the shape classifier) and
`{out}/training.json` (settings and measured figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..tiny import SD14_SCHEDULER_CONFIG, clip_text_encoder, save_pipeline, vae_model
from ..tokenizer import build_tokenizer
from .classifier import ShapeClassifier, augment, save_classifier, to_tensor
from .world import dataset, ontology, shapes, vocabulary

log = logging.getLogger(__name__)


def build_models(tokenizer_dir: Path, seed: int = 0):
    from diffusers import UNet2DConditionModel

    max_length = ontology()["text_space"]["max_length"]
    tokenizer = build_tokenizer(vocabulary(), tokenizer_dir, max_length=max_length)
    vae = vae_model((16, 32), 32, norm_num_groups=8)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed)  # the frozen encoder's random layers are the model: seed them alone
    text_encoder = clip_text_encoder(
        tokenizer, hidden=64, intermediate=256, layers=2, heads=4, positions=max_length
    )
    structure_text_space(text_encoder, tokenizer, seed)
    return tokenizer, vae, unet, text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def structure_text_space(text_encoder, tokenizer, seed: int) -> None:
    """Word embeddings that share one direction per shape (ontology `text_space`).

    Synonyms then sit closer to each other than to other shapes, as in a real text encoder;
    colours and "a" get their own directions. The encoder stays frozen at this init.
    """
    space = ontology()["text_space"]
    share, related = space["synonym_share"], space["relative_share"]
    hidden = text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(seed + 17)
    shape_direction = {s: torch.randn(hidden, generator=g) for s in shapes()}
    for shape, spec in ontology()["shapes"].items():  # a relative shares part of its direction
        if spec.get("relative"):
            own = shape_direction[shape]
            shape_direction[shape] = related**0.5 * shape_direction[spec["relative"]]
            shape_direction[shape] += (1 - related) ** 0.5 * own
    table = text_encoder.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    for word in vocabulary():
        own = torch.randn(hidden, generator=g)
        shape = next(
            (s for s, spec in ontology()["shapes"].items()
             if any(word in name.split() for name in spec["names"])),
            None,
        )  # fmt: skip
        if shape is not None:
            own = share**0.5 * shape_direction[shape] + (1 - share) ** 0.5 * own
        table[vocab[f"{word}</w>"]] = own


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-4 * posterior.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        x = images[-256:]
        return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()


def train_unet(unet, text_encoder, tokenizer, latents, captions, steps, batch, lr, seed):
    from diffusers import DDPMScheduler

    from crce.modeling import encode_prompts

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    noise_scheduler = DDPMScheduler.from_config(json.loads(SD14_SCHEDULER_CONFIG.read_text()))
    params = list(unet.parameters())  # the text encoder stays frozen (ontology text_space)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 100))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    # A frozen encoder: every distinct caption is encoded once.
    distinct = sorted(set(captions))
    contexts = encode_prompts(SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder),
                              [*distinct, ""])  # fmt: skip
    position = {c: i for i, c in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in captions])
    empty = len(distinct)
    unet.train()
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=g)
        mean, std = latents[idx].chunk(2, dim=1)
        z = mean + std * torch.randn(mean.shape, generator=g)
        which = caption_index[idx].clone()
        for k in range(batch):
            if rng.random() < 0.1:
                which[k] = empty  # caption dropout: the model learns the unconditional branch
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = noise_scheduler.add_noise(z, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=contexts[which]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in zip(ema_unet.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pl, 1 - decay)
        if step % 200 == 0:
            log.info(
                "unet step %d/%d loss %.4f (%.0f s)",
                step,
                steps,
                loss.item(),
                time.perf_counter() - started,
            )
    return ema_unet.eval()


def train_classifier(steps: int, batch: int, seed: int) -> tuple[ShapeClassifier, float]:
    images, _, labels = dataset(12_000, seed + 7)
    x, y = to_tensor(images), torch.tensor(labels)
    model = ShapeClassifier(len(shapes()))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_images, _, test_labels = dataset(2_000, seed + 99)  # held-out renders
    with torch.no_grad():
        predicted = model(to_tensor(test_images)).argmax(1)
    return model, (predicted == torch.tensor(test_labels)).float().mean().item()


@torch.no_grad()
def prompt_following(pipe_dir: Path, classifier: ShapeClassifier, per_prompt: int = 8) -> dict:
    """Share of samples whose shape (by the classifier) is the one the prompt names."""
    from crce.modeling import load_pipeline

    from .world import ontology

    pipe = load_pipeline(str(pipe_dir))
    rates = {}
    for shape, spec in ontology()["shapes"].items():
        for name in spec["names"]:
            generators = [torch.Generator().manual_seed(1000 + k) for k in range(per_prompt)]
            images = pipe([name] * per_prompt, num_inference_steps=25, guidance_scale=5.0,
                          height=32, width=32, generator=generators, output_type="np").images  # fmt: skip
            pred = classifier(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).argmax(1)
            rates[name] = (pred == shapes().index(shape)).float().mean().item()
    return {"per_prompt": rates, "mean": sum(rates.values()) / len(rates)}


def train_world(out: str | Path, *, seed: int = 0, quick: bool = False) -> dict:
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = dict(
        images=2_000 if quick else 30_000,
        vae_steps=30 if quick else 800,
        unet_steps=30 if quick else 3_600,  # 8 shapes (oval and diamond added): +20%
        classifier_steps=30 if quick else 1_200,
        batch=32,
        unet_lr=1e-3,
        seed=seed,
    )
    timings = {}
    began = time.perf_counter()
    images, captions, _ = dataset(plan["images"], seed)
    x = to_tensor(images)
    timings["data_s"] = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vae, unet, text_encoder = build_models(Path(tmp), seed)
        began = time.perf_counter()
        vae_mse = train_vae(vae, x, plan["vae_steps"], plan["batch"], seed)
        timings["vae_s"] = time.perf_counter() - began
        with torch.no_grad():
            dist = torch.cat(
                [vae.encode(x[k : k + 512]).latent_dist.mean for k in range(0, len(x), 512)]
            )
            scaling = 1.0 / dist.std().item()
            moments = (
                torch.cat(
                    [
                        torch.cat([p.mean, p.std], 1)
                        for p in (
                            vae.encode(x[k : k + 512]).latent_dist for k in range(0, len(x), 512)
                        )
                    ]
                )
                * scaling
            )
        vae.register_to_config(scaling_factor=scaling)
        began = time.perf_counter()
        unet = train_unet(
            unet,
            text_encoder,
            tokenizer,
            moments,
            captions,
            plan["unet_steps"],
            plan["batch"],
            plan["unet_lr"],
            seed,
        )
        timings["unet_s"] = time.perf_counter() - began
        save_pipeline(
            out / "sd", vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet
        )
    began = time.perf_counter()
    classifier, accuracy = train_classifier(plan["classifier_steps"], 64, seed)
    timings["classifier_s"] = time.perf_counter() - began
    save_classifier(classifier, out)
    following = prompt_following(out / "sd", classifier, per_prompt=2 if quick else 8)
    record = {
        "plan": plan,
        "timings": timings,
        "vae_val_mse": vae_mse,
        "judge_heldout_accuracy": accuracy,
        "prompt_following": following,
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="resources/toy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (tests)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Denormal floats (tiny Adam moments late in training) slow x86 matmuls many-fold.
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = train_world(args.out, seed=args.seed, quick=args.quick)
    print(
        json.dumps(
            {k: record[k] for k in ("timings", "vae_val_mse", "judge_heldout_accuracy")}, indent=2
        )
    )
    print("prompt following:", record["prompt_following"]["mean"])


if __name__ == "__main__":
    main()
