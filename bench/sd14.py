"""Random weights in SD v1.4's exact shapes, for benchmarks (no real weights are needed to time)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from crce_worlds.tiny import clip_text_encoder, save_pipeline, vae_model


def build_sd14_size_pipeline(output: str | Path, seed: int = 0) -> Path:
    """Random weights in SD v1.4's exact shapes (benchmarks): UNet 320/640/1280/1280, CLIP-L text."""
    from diffusers import UNet2DConditionModel

    from crce_worlds.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = vae_model((128, 256, 512, 512), 512, layers_per_block=2)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer([], tmp, max_length=77)
        text_encoder = clip_text_encoder(
            tokenizer, hidden=768, intermediate=3072, layers=12, heads=12, positions=77, vocab=49408
        )
        return save_pipeline(
            output, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet
        )
