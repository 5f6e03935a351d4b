"""Paper Table 2: how near each coref and retain is to the target in the model's text space.

Distances are computed on L2-normalised embeddings, as the paper's are (its Euclidean column
equals sqrt(2 - 2 cos) on every row). Two embeddings, two pairs of columns:
- `cosine`, `euclidean`: the pooled CLIP text embedding (the final hidden state at the end
  token, `pooler_output`): CLIP's own sentence embedding, the space the paper calls "CLIP text
  space", independent of prompt length and padding. (SD v1.4 ships no text projection, so this
  is the pooled state before CLIP's projection.)
- `cosine_tokens`, `euclidean_tokens`: the flattened per-token conditioning the UNet sees.
"""

from __future__ import annotations

import pandas as pd
import torch

from .lists import Split
from .modeling import load_pipeline, tokenize


@torch.no_grad()
def text_embeddings(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled ([n, D]) and flattened per-token ([n, L*D]) embeddings, L2-normalised."""
    tokens = tokenize(pipe, prompts).input_ids.to(pipe.text_encoder.device)
    output = pipe.text_encoder(tokens)
    normalise = lambda x: torch.nn.functional.normalize(x.float(), dim=1)  # noqa: E731
    return normalise(output.pooler_output), normalise(output.last_hidden_state.flatten(1))


def _distances(embeddings: torch.Tensor) -> tuple[list[float], list[float]]:
    """Cosine and Euclidean distance of rows 1.. to row 0 (unit vectors)."""
    target, others = embeddings[0:1], embeddings[1:]
    cosine = (others @ target.T).squeeze(1)
    return cosine.tolist(), (others - target).norm(dim=1).tolist()


def text_distances(pipe, split: Split) -> pd.DataFrame:
    items = [(group, i.text, i.certainty.value) for group, i in split.items()]
    pooled, tokens = text_embeddings(pipe, [split.concept] + [text for _, text, _ in items])
    (cos, euc), (cos_t, euc_t) = _distances(pooled), _distances(tokens)
    rows = []
    for k, (group, text, certainty) in enumerate(items):
        rows.append(
            {
                "concept": split.concept,
                "id": split.id,
                "group": group,
                "text": text,
                "certainty": certainty,
                "cosine": cos[k],
                "euclidean": euc[k],
                "cosine_tokens": cos_t[k],
                "euclidean_tokens": euc_t[k],
            }
        )
    return pd.DataFrame(rows)


def run(*, split_path: str, pretrained: str, output: str) -> None:
    from .lists import read_split

    pipe = load_pipeline(pretrained)
    text_distances(pipe, read_split(split_path)).to_csv(output, index=False, float_format="%.6g")
