"""Loading the base text-to-image model and its UNet parameters, the same for every size."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def _is_attn2(name: str) -> bool:
    return ".attn2." in name


# Trained parameter sets by parameter name, as the official codes name them (README: "paper
# vs official code"). `noxattn-compvis` is the original ESD code's ESD-u
# (train-scripts/train-esd.py: every parameter but attn2, `out.` and `time_embed`, norms
# included); `noxattn` (ESD-u of the ESD code's diffusers version) selects by module below.
PARAM_SETS = {
    "xattn-kv": lambda n: _is_attn2(n) and (".to_k." in n or ".to_v." in n),
    "xattn-qk": lambda n: _is_attn2(n) and (".to_q." in n or ".to_k." in n),
    "xattn": lambda n: _is_attn2(n),
    "full": lambda n: True,
    "noxattn-compvis": lambda n: (
        not _is_attn2(n) and not n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))
    ),
}
# The ESD code's diffusers version (rohitgandikota/erasing at 25613d2, esd_sd.py,
# get_esd_trainable_parameters): modules of these classes whose name has no `attn2`, every
# parameter of each (weights and biases; no norm).
ESD_LAYER_CLASSES = ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv")


def select_parameters(unet, param_set: str) -> list[str]:
    """The UNet parameter names a parameter set trains."""
    if param_set == "noxattn":
        return [
            f"{module_name}.{name}"
            for module_name, module in unet.named_modules()
            if type(module).__name__ in ESD_LAYER_CLASSES and "attn2" not in module_name
            for name, _ in module.named_parameters()
        ]
    select = PARAM_SETS[param_set]
    return [name for name, _ in unet.named_parameters() if select(name)]


class ModelLoadError(RuntimeError):
    pass


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def device_for(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_pipeline(pretrained: str, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """`StableDiffusionPipeline.from_pretrained` (a hub id or a local diffusers folder)."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError...
        raise ModelLoadError(
            f"cannot load model.pretrained={pretrained!r} with StableDiffusionPipeline."
            f"from_pretrained ({type(err).__name__}: {err}). Give a local diffusers folder or a "
            "hub id; on a cluster without internet run the `download` target first."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    with contextlib.suppress(Exception):
        # SDPA is the default processor in diffusers 0.42; made explicit for clarity.
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    return pipe.to(device)


def tokenize(pipe, prompts: list[str]):
    """Stable Diffusion's tokenization: padded to the encoder's length, truncated."""
    return pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states, as Stable Diffusion conditions on them."""
    return pipe.text_encoder(tokenize(pipe, prompts).input_ids.to(pipe.text_encoder.device))[0]


def extended_embedding(base, rows, first_id: int):
    """The text encoder's token embedding with rows appended for new tokens: ids from
    `first_id` on read `rows` (a trainable tensor), the rest the base table (FMN's
    placeholders, UnlearnDiffAtk's prefix)."""

    class Extended(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        @property
        def weight(self):
            return self.base.weight

        def forward(self, ids):
            new = ids >= first_id
            found = torch.nn.functional.embedding(ids.where(~new, 0), self.base.weight)
            extra = rows.to(found.dtype)[(ids - first_id).clamp(min=0)]
            return torch.where(new[..., None], extra, found)

    return Extended()
