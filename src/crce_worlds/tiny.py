"""A tiny random Stable Diffusion pipeline, built deterministically from configs (tests).

SD v1.4's module names (attn2 to_q/to_k/to_v/to_out), so the trainer's parameter selection
and the saved deltas are exactly those of the real model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch


def clip_text_encoder(
    tokenizer,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    positions: int,
    vocab: int | None = None,
):
    """A CLIPTextModel sized by hand, with the tokenizer's special-token ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab or len(tokenizer.get_vocab()),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# SD v1.4's own scheduler config, verbatim (a PNDMScheduler): every small world saves it, so
# the code that picks the sampling and training schedulers meets what the real model ships.
SD14_SCHEDULER_CONFIG = Path(__file__).with_name("sd14_scheduler_config.json")


def save_pipeline(output: str | Path, *, vae, text_encoder, tokenizer, unet) -> Path:
    """Assemble a StableDiffusionPipeline (SD v1.4's scheduler, no safety checker), save it."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    config = json.loads(SD14_SCHEDULER_CONFIG.read_text())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output = Path(output)
    pipe.save_pretrained(output, safe_serialization=True)
    # save_pretrained writes diffusers' fuller form; keep SD v1.4's file as it is published.
    shutil.copyfile(SD14_SCHEDULER_CONFIG, output / "scheduler" / "scheduler_config.json")
    return output


def vae_model(channels: tuple[int, ...], sample_size: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        sample_size=sample_size,
        **extra,
    )


def build_tiny_pipeline(output: str | Path, seed: int = 0, words: list[str] | None = None) -> Path:
    from diffusers import UNet2DConditionModel

    from .tokenizer import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = vae_model((16, 32), 32, norm_num_groups=8)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(words or [], tmp, max_length=16)
        text_encoder = clip_text_encoder(
            tokenizer, hidden=32, intermediate=64, layers=2, heads=4, positions=16
        )
        return save_pipeline(
            output, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet
        )


def build_tiny_clip(output: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel (image 32 px, features of 16) with its processor and tokenizer,
    saved to load with from_pretrained like openai/clip-vit-large-patch14."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from .tokenizer import build_tokenizer

    torch.manual_seed(seed)
    output = Path(output)
    tokenizer = build_tokenizer([], output, max_length=16)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    CLIPModel(config).save_pretrained(output)
    tokenizer.save_pretrained(output)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(output)
    return output


# The test world's concepts' words, lower-cased as BERT's uncased tokenizer reads them.
GSAM_WORDS = ["cat", "bat", "animal", "harry", "potter", "beyonce", "a", "person", "photo", "of"]


def build_tiny_gsam(detector: str | Path, sam: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random GroundingDINO (Swin backbone at 128 px: its last stage stays above 1x1;
    two decoder layers, its minimum) with a BERT tokenizer from a local vocabulary, and a
    tiny random SAM (64 px, its prompt encoder as wide as the vision neck's output), each
    saved with its processor to load with from_pretrained like the hub's models."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )

    torch.manual_seed(seed)
    detector, sam = Path(detector), Path(sam)
    detector.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *GSAM_WORDS]
    (detector / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(detector / "vocab.txt"))
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=2,
                          out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    text = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, encoder_n_points=2,
        decoder_n_points=2, max_text_len=16,
    )  # fmt: skip
    images = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(detector)
    GroundingDinoForObjectDetection(config).save_pretrained(detector)

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=64, patch_size=16, output_channels=16, window_size=2,
                             global_attn_indexes=[0], mlp_dim=64, num_pos_feats=8)  # fmt: skip
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16,
                                    mask_input_channels=4)  # fmt: skip
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   mlp_dim=32, iou_head_hidden_dim=16)  # fmt: skip
    SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())).save_pretrained(sam)  # fmt: skip
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16},
    )).save_pretrained(sam)  # fmt: skip
    return detector, sam
