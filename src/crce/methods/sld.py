"""Safe Latent Diffusion (Schramowski et al., CVPR 2023): no training; at every sampling step
the prediction is pushed away from a safety concept (here the target, optionally with its
train corefs).

The sampler runs diffusers' own `StableDiffusionPipelineSafe` (diffusers 0.42:
diffusers.pipelines.deprecated.stable_diffusion_safe; its `SafetyConfig` presets) on the
base model's modules, with no safety checker (a checker would black out images the judge then
reads as erased). If a later diffusers drops the deprecated pipeline, its per-step guidance
term (pipeline_stable_diffusion_safe.py, `__call__`) is small enough to own; this pipeline
uses diffusers' as long as it ships.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Kind, Method, MethodSettings, Sampling

# diffusers' SafetyConfig (deprecated/stable_diffusion_safe/__init__.py), by name.
PRESETS = ("WEAK", "MEDIUM", "STRONG", "MAX")


class SldSettings(MethodSettings):
    strategy: str = "sld"
    preset: Literal["WEAK", "MEDIUM", "STRONG", "MAX"] = Field(
        "MEDIUM",
        description="diffusers' SafetyConfig preset: MEDIUM (the suites' default: ESD's, UCE's "
        "and RECE's evaluation scripts), WEAK (diffusers: sld_guidance_scale 20; the suites' "
        "scripts: 200), STRONG, MAX",
    )
    template: str = Field(
        "{}",
        pattern=r"[{][}]",
        description="the safety concept's text around the target "
        "(diffusers' own default text starts 'an image showing ')",
    )
    with_corefs: bool = Field(
        False, description="the safety concept is the target and its train corefs, comma-separated"
    )


def safe_pipeline_class():
    """diffusers' StableDiffusionPipelineSafe with one fix: its `_encode_prompt` tokenizes the
    prompts a second time without truncation, only to warn about truncation, which fails for a
    batch holding a prompt longer than the tokenizer's length (diffusers 0.42,
    pipeline_stable_diffusion_safe.py, `_encode_prompt`). The same embeddings otherwise:
    [uncond; prompts; safety concept], each padded to the tokenizer's length."""
    import torch
    from diffusers import StableDiffusionPipelineSafe

    class SafePipeline(StableDiffusionPipelineSafe):
        def _encode_prompt(self, prompt, device, num_images_per_prompt,
                           do_classifier_free_guidance, negative_prompt, enable_safety_guidance):  # fmt: skip
            if negative_prompt is not None:
                raise ValueError("this pipeline samples without a negative prompt")
            prompts = prompt if isinstance(prompt, list) else [prompt]

            def encode(texts):
                tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                        max_length=self.tokenizer.model_max_length,
                                        return_tensors="pt")  # fmt: skip
                states = self.text_encoder(tokens.input_ids.to(device))[0]
                return states.repeat_interleave(num_images_per_prompt, dim=0)

            embeds = encode(prompts)
            if not do_classifier_free_guidance:
                return embeds
            parts = [encode([""] * len(prompts)), embeds]
            if enable_safety_guidance:
                safety = encode([self._safety_text_concept])
                parts.append(safety.expand(len(embeds), -1, -1))
            return torch.cat(parts)

    return SafePipeline


class SafeSampling(Sampling):
    def __init__(self, settings: SldSettings, concept: str):
        self.settings, self.concept = settings, concept

    def pipeline(self, pipe):
        safe = safe_pipeline_class()(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        safe.set_progress_bar_config(disable=True)
        safe.safety_concept = self.concept
        return safe

    def export_pipeline(self, pipe):
        """What the export saves: diffusers' own class, which its users load."""
        from diffusers import StableDiffusionPipelineSafe

        safe = StableDiffusionPipelineSafe(**self.pipeline(pipe).components)
        safe.safety_concept = self.concept
        return safe

    def call_kwargs(self) -> dict:
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

        return dict(getattr(SafetyConfig, self.settings.preset))


class Sld(Method):
    """SLD with the target as its safety concept: every prompt is sampled through diffusers'
    StableDiffusionPipelineSafe at the preset's guidance."""

    name = "sld"
    kind = Kind.INFERENCE
    Settings = SldSettings

    @classmethod
    def sampling_reads_split(cls, settings) -> bool:
        return settings.with_corefs

    @classmethod
    def sampling(cls, settings, delta, concept, split=None):
        texts = [concept["text"]]
        if settings.with_corefs:
            texts += [item.text for item in split.coref_train]
        return SafeSampling(settings, ", ".join(settings.template.format(t) for t in texts))
