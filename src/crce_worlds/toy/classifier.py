"""The toy judge's eyes: a small CNN that tells which shape an image shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ShapeClassifier(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], NCHW."""
        return self.head(self.features(x).flatten(1))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[n, H, W, 3] uint8 images as the classifier's input: NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def read_image(source) -> np.ndarray:
    """An image file (path or file object) as the classifier sees it: RGB, 32 x 32."""
    from PIL import Image

    return np.asarray(Image.open(source).convert("RGB").resize((32, 32)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise, so sampled images (slightly soft, slightly noisy) are read right."""
    if torch.rand((), generator=generator) < 0.5:
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.nn.functional.conv2d(x, kernel, padding=1, groups=3)
    noise = torch.randn(x.shape, generator=generator) * torch.rand((), generator=generator) * 0.15
    return (x + noise).clamp(-1, 1)


def save_classifier(model: ShapeClassifier, folder: str | Path) -> None:
    from safetensors.torch import save_file

    from .world import shapes

    folder = Path(folder)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "judge.safetensors"),
    )
    (folder / "judge.json").write_text(json.dumps({"classes": shapes()}, indent=2) + "\n")


def load_classifier(folder: str | Path) -> tuple[ShapeClassifier, list[str]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    classes = json.loads((folder / "judge.json").read_text())["classes"]
    model = ShapeClassifier(len(classes))
    model.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return model.eval(), classes


class ToyFeatures:
    """Image embeddings from the shape classifier's penultimate layer (L2-normalised): the toy
    world's stand-in for CLIP's image tower in the quality target (`features.kind:
    crce_worlds.toy.classifier:ToyFeatures`). No text tower; runs on the CPU."""

    def __init__(
        self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 256
    ):
        self.model, self.classes = load_classifier(folder)
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, paths):
        batch_size = self.batch_size
        out = []
        for start in range(0, len(paths), batch_size):
            batch = np.stack([read_image(p) for p in paths[start : start + batch_size]])
            features = self.model.features(to_tensor(batch)).flatten(1)
            out.append(torch.nn.functional.normalize(features, dim=1).numpy())
        return np.concatenate(out)
