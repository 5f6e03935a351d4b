"""What erasure costs the model beyond its target (the `quality` target).

- Collateral damage, no new images: every retain image of an erased model has an SD twin from
  the same seed (paired sampling); their mean image-embedding cosine says how much the method
  changed what it should have left alone.
- General quality on neutral prompts (a fixed-seed subset of MS-COCO captions): each concept's
  model draws `per_concept` of them, SD draws the same; CLIP score (Hessel et al. 2021) per
  method, and the Fréchet distance and KID of each method's images against SD's on the same
  prompts (and against real images when a folder is given), on the same embeddings. Every value
  comes with its sample size and spread: a 95% CI half-width, KID's standard error over
  subsets, or the Fréchet distance's bootstrap standard deviation.

Embeddings: CLIP (image tower, projected, L2-normalised) by default, weights through
`download`; torchvision cannot be installed here and Inception/LPIPS weights are not on the
model hub, so no metric depends on them. The toy world, which has no CLIP, uses its shape
classifier's penultimate layer (no text tower: no CLIP score there).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .settings import FeatureRuntime, FeatureSettings, QualitySettings
from .stats import clip_score, frechet_distance, kid, mean_ci


# -- embeddings ----------------------------------------------------------------------------
def embed(
    manifests: list[str], settings: FeatureSettings, runtime: FeatureRuntime, output: str
) -> None:
    """The `features` rule: embeddings of a (method, concept)'s retain and neutral images, and
    each neutral image's CLIP score against its prompt."""
    frames = []
    for path in manifests:
        frame = pd.read_parquet(path)
        frames.append(frame[frame["group"].isin(["retain_train", "retain_test", "neutral"])])
    images = pd.concat(frames, ignore_index=True)
    from .vision import encoder

    model = encoder(settings, runtime)
    features = model.images(list(images["path"]))
    images["feature"] = list(features.astype(np.float32))
    images["clip_score"] = math.nan
    neutral = (images["group"] == "neutral").to_numpy()
    if neutral.any() and hasattr(model, "texts"):
        texts = model.texts(list(images.loc[neutral, "prompt"]))
        images.loc[neutral, "clip_score"] = clip_score(features[neutral], texts)
    keep = ["method", "concept", "group", "prompt", "image_index", "seed", "feature", "clip_score"]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    images[keep].to_parquet(output, index=False)


# -- the table -----------------------------------------------------------------------------
def _row(method, scope, metric, value, n, spread, kind) -> dict:
    return {"method": method, "scope": scope, "metric": metric, "value": value, "n": n,
            "spread": spread, "spread_kind": kind}  # fmt: skip


def _ci(values) -> tuple[float, float]:
    """The mean and its 95% CI half-width (NaN for a single value)."""
    mean, low, _ = mean_ci(values)
    return mean, mean - low


def _bootstrap_fd(a, b) -> float:
    """The Fréchet distance's spread: its standard deviation over 20 seeded resamplings."""
    rng = np.random.default_rng(0)
    values = [
        frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
        for _ in range(20)
    ]
    return float(np.std(values, ddof=1))


def quality_table(
    features: pd.DataFrame,
    categories: dict[str, str],
    labels: dict[str, str],
    settings: QualitySettings,
    real: np.ndarray | None = None,
    baseline: str = "sd",
) -> pd.DataFrame:
    """results/quality.csv: method, scope (a category, or coco), metric, value, n, spread."""
    rows = []
    features = features.assign(category=features["concept"].map(categories))
    retain = features[features["group"] != "neutral"]
    neutral = features[features["group"] == "neutral"]
    keys = ["concept", "group", "prompt", "image_index"]
    base = retain[retain["method"] == baseline].set_index(keys)["feature"]
    base_neutral = (
        np.stack(neutral[neutral["method"] == baseline]["feature"]) if len(neutral) else None
    )
    for method in [m for m in labels if m in set(features["method"])]:
        label = labels[method]
        mine = retain[retain["method"] == method]
        if method != baseline and len(mine):
            twins = mine.join(base.rename("twin"), on=keys, how="inner")
            cosine = np.array(
                [float(np.dot(a, b)) for a, b in zip(twins["feature"], twins["twin"], strict=True)]
            )
            for scope, group in twins.assign(cos=cosine).groupby("category"):
                mean, half = _ci(group["cos"])
                rows.append(_row(label, scope, "paired_similarity", mean, len(group), half, "ci95"))
        ours = neutral[neutral["method"] == method]
        if not len(ours):
            continue
        scores = ours["clip_score"].dropna()
        if len(scores):
            mean, half = _ci(scores)
            rows.append(_row(label, "coco", "clip_score", mean, len(scores), half, "ci95"))
        stacked = np.stack(ours["feature"])
        others = []
        if method != baseline and base_neutral is not None:
            others.append(("sd", base_neutral))
        if real is not None:
            others.append(("real", real))
        for name, reference in others:
            fd = frechet_distance(stacked, reference)
            rows.append(
                _row(
                    label,
                    "coco",
                    f"fd_vs_{name}",
                    fd,
                    len(stacked),
                    _bootstrap_fd(stacked, reference),
                    "bootstrap_sd",
                )
            )
            mean, se = kid(
                stacked,
                reference,
                subsets=settings.kid_subsets,
                subset_size=settings.kid_subset_size,
                seed=settings.seed,
            )
            rows.append(_row(label, "coco", f"kid_vs_{name}", mean, len(stacked), se, "se"))
    return pd.DataFrame(
        rows, columns=["method", "scope", "metric", "value", "n", "spread", "spread_kind"]
    )


def run_quality(
    *,
    features: list[str],
    categories: dict[str, str],
    labels: dict[str, str],
    settings: dict,
    feature_settings: dict,
    runtime: dict,
    output: str,
    figure: str,
) -> None:
    """The `quality` rule."""
    settings = QualitySettings(**settings)
    frame = pd.concat([pd.read_parquet(p) for p in features], ignore_index=True)
    real = None
    if settings.real_images:
        paths = sorted(
            str(p)
            for p in Path(settings.real_images).rglob("*")
            if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        )
        from .vision import encoder

        real = encoder(FeatureSettings(**feature_settings), FeatureRuntime(**runtime)).images(paths)
    table = quality_table(frame, categories, labels, settings, real)
    table.to_csv(output, index=False, float_format="%.6g")
    from .figures import quality_bars

    quality_bars(table, figure)


def run_features(*, manifests: list[str], settings: dict, runtime: dict, output: str) -> None:
    embed(manifests, FeatureSettings(**settings), FeatureRuntime(**runtime), output)
