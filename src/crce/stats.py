"""Statistics for evaluating image generators: FID-style and KID distances, rater agreement,
confidence intervals and CLIPScore.

Numpy only (scipy is not a dependency of the project): matrix square roots come from
eigen-decompositions of symmetric PSD matrices, the normal quantile from the standard library.
Features are 2-D arrays, one row per sample.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from statistics import NormalDist

import numpy as np

# Hessel et al. 2021 (CLIPScore): CLIP cosines of matching pairs rarely exceed ~0.4, so the
# authors rescale by w = 2.5 to put scores roughly in [0, 1].
CLIP_SCORE_WEIGHT = 2.5


def _features(x: np.ndarray, name: str) -> np.ndarray:
    """Float64 copy of a [samples, dims] feature array; other shapes are a caller error."""
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [samples, dims], got shape {array.shape}")
    return array


def _same_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; rounding can leave tiny negative eigenvalues,
    which are clipped to 0 rather than turned into NaNs."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features a [n, d] and b [m, d] (the FID
    formula): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Covariances use np.cov's default ddof=1. Tr((S_a S_b)^(1/2)) is computed in the symmetric
    form Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which has the same eigenvalues but stays
    symmetric PSD, so eigh applies and no complex parts appear (unlike sqrtm of S_a S_b).
    The distance is non-negative; rounding below 0 is clipped to 0.
    """
    a = _features(a, "a")
    b = _features(b, "b")
    _same_dims(a, b)
    d = a.shape[1]
    for n in (a.shape[0], b.shape[0]):
        if n <= d:
            raise ValueError(
                "the Fréchet distance needs more samples than feature dimensions "
                f"(n={n}, d={d}): the covariance would be singular"
            )
    mean_diff = a.mean(axis=0) - b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(distance, 0.0)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with KID's cubic kernel: mean off-diagonal K_aa + mean off-diagonal K_bb
    - 2 mean K_ab. Diagonals are left out because k(x, x) biases the estimate upwards; the
    result can therefore be slightly negative for equal distributions."""
    a = _features(a, "a")
    b = _features(b, "b")
    _same_dims(a, b)
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD^2 needs at least 2 samples per set (n={n}, m={m})")
    k_aa = _polynomial_kernel(a, a)
    k_bb = _polynomial_kernel(b, b)
    k_ab = _polynomial_kernel(a, b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def kid(
    a: np.ndarray,
    b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 averaged over `subsets` random subsets of
    size min(subset_size, n, m), drawn without replacement (numpy default_rng(seed)) so the
    cost stays quadratic in the subset size, not the sample.

    Returns (mean, standard error over subsets = std(ddof=1) / sqrt(subsets)); the standard
    error is NaN for a single subset. When the subset is the whole sample every subset holds
    the same data (indices are sorted), so the standard error is exactly 0.
    """
    a = _features(a, "a")
    b = _features(b, "b")
    _same_dims(a, b)
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        pick_a = np.sort(rng.choice(a.shape[0], size, replace=False))
        pick_b = np.sort(rng.choice(b.shape[0], size, replace=False))
        values[i] = mmd2_unbiased(a[pick_a], b[pick_b])
    if subsets == 1:
        return float(values[0]), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(subsets))


def _paired_labels(x: Sequence[Hashable], y: Sequence[Hashable]) -> tuple[list, list]:
    x, y = list(x), list(y)
    if len(x) != len(y):
        raise ValueError(f"raters labelled different numbers of items: {len(x)} vs {len(y)}")
    if not x:
        raise ValueError("no labels to compare")
    return x, y


def agreement(x: Sequence[Hashable], y: Sequence[Hashable]) -> float:
    """Share of items on which the two raters give the same label."""
    x, y = _paired_labels(x, y)
    return sum(p == q for p, q in zip(x, y, strict=True)) / len(x)


def cohen_kappa(x: Sequence[Hashable], y: Sequence[Hashable]) -> float:
    """Cohen's kappa (po - pe) / (1 - pe): agreement corrected for the agreement expected by
    chance from each rater's label frequencies. Computed from integer counts, so exact.

    When pe = 1 (both raters gave one and the same label throughout) kappa is 0/0; we return
    1.0 if observed agreement is 1 (which it then is), else 0.0.
    """
    x, y = _paired_labels(x, y)
    n = len(x)
    observed = sum(p == q for p, q in zip(x, y, strict=True))
    count_x, count_y = Counter(x), Counter(y)
    expected = sum(count_x[label] * count_y[label] for label in count_x)  # pe * n^2
    if expected == n * n:
        return 1.0 if observed == n else 0.0
    return (observed * n - expected) / (n * n - expected)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and normal-approximation confidence interval mean ± z * std(ddof=1) / sqrt(n).

    Returns (mean, low, high); a single value has no spread estimate, so (v, nan, nan).
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(array.mean())
    if array.size == 1:
        return mean, math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * float(array.std(ddof=1)) / math.sqrt(array.size)
    return mean, mean - half, mean + half


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Per-pair CLIPScore (Hessel et al. 2021): w * max(cos(image_i, text_i), 0), w = 2.5.

    Rows are L2-normalised first, so the score depends on direction only; a negative cosine
    counts as no match (0). A 1-D pair of vectors is treated as one row.
    """
    image = np.atleast_2d(np.asarray(image_features, dtype=np.float64))
    text = np.atleast_2d(np.asarray(text_features, dtype=np.float64))
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image and text features must pair up: {image.shape} vs {text.shape}")
    image_norm = np.linalg.norm(image, axis=1)
    text_norm = np.linalg.norm(text, axis=1)
    if np.any(image_norm == 0) or np.any(text_norm == 0):
        raise ValueError("a zero feature vector has no direction, so no cosine")
    cosine = np.einsum("ij,ij->i", image, text) / (image_norm * text_norm)
    return CLIP_SCORE_WEIGHT * np.maximum(cosine, 0.0)
