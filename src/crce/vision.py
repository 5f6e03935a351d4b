"""Image (and text) features for the evaluation targets beyond Table 1 (quality, the judge
audit): `encoder` builds CLIP (a CLIPModel loaded with from_pretrained,
openai/clip-vit-large-patch14 by default, fetched by `download`; the test world builds a tiny
random one) or an encoder named `module:Class` (the toy world's shape classifier): a class
taking (pretrained, device, batch_size) with `images(paths)` and, for a CLIP score,
`texts(texts)`, both L2-normalised numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .modeling import device_for
from .plugins import load_object
from .settings import FeatureRuntime, FeatureSettings


def encoder(settings: FeatureSettings, runtime: FeatureRuntime):
    """The image (and text) embedding on the runtime's device at its batch size."""
    cls = ClipFeatures if settings.kind == "clip" else load_object(settings.kind, "encoder")
    return cls(settings.pretrained, device_for(runtime.device), batch_size=runtime.batch_size)


class ClipFeatures:
    """L2-normalised CLIP embeddings of images (files) and texts."""

    def __init__(self, pretrained: str, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(pretrained).to(self.device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)

    @torch.no_grad()
    def images(self, paths: list[str | Path]) -> np.ndarray:
        from PIL import Image

        batch_size = self.batch_size
        out = []
        for start in range(0, len(paths), batch_size):
            batch = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out.append(_normalised(features.pooler_output))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        return _normalised(self.model.get_text_features(**tokens).pooler_output)


def _normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
