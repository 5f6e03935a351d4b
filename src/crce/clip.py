"""Paper Table 2: distance of each coref/retain to the target in the model's text space."""

from __future__ import annotations

import pandas as pd
import torch

from .lists import Split
from .modeling import encode_prompts, load_pipeline
from .settings import GROUPS


def text_distances(pipe, split: Split) -> pd.DataFrame:
    items = [(g, i.text, i.certainty.value) for g in GROUPS[1:] for i in getattr(split, g)]
    embeddings = encode_prompts(pipe, [split.concept] + [text for _, text, _ in items])
    flat = embeddings.flatten(1).float()  # what the UNet is conditioned on
    target = flat[0:1]
    cosine = torch.nn.functional.cosine_similarity(flat[1:], target).tolist()
    euclidean = (flat[1:] - target).norm(dim=1).tolist()
    return pd.DataFrame(
        [
            {
                "concept": split.concept,
                "group": group,
                "text": text,
                "certainty": certainty,
                "cosine": cos,
                "euclidean": dist,
            }
            for (group, text, certainty), cos, dist in zip(items, cosine, euclidean, strict=True)
        ]
    )


def run(*, split_path: str, pretrained: str, output: str) -> None:
    from .lists import read_split

    pipe = load_pipeline(pretrained)
    text_distances(pipe, read_split(split_path)).to_csv(output, index=False, float_format="%.6g")
