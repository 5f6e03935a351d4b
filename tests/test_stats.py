"""crce.stats against hand-computed, closed-form and textbook values (never against itself)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from crce.stats import (
    agreement,
    clip_score,
    cohen_kappa,
    frechet_distance,
    kid,
    mean_ci,
    mmd2_unbiased,
)

# --- Fréchet distance ----------------------------------------------------------------------
# Point sets with exactly known sample mean and covariance (ddof=1, as np.cov), so the
# expected distance is a closed form, not a Monte Carlo estimate.


def three_points_1d(mean: float, spread: float) -> np.ndarray:
    """{mean - s, mean, mean + s}: sample mean `mean`, variance (2 s^2) / (3 - 1) = s^2."""
    return np.array([[mean - spread], [mean], [mean + spread]])


def factorial_design(mean: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """All 2^d points mean + (±o_1, ..., ±o_d): sample mean `mean`; cross products cancel over
    the sign patterns, so the covariance is diagonal with var_i = 2^d o_i^2 / (2^d - 1)."""
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=len(offsets))))
    return mean + signs * offsets


def test_frechet_1d_gaussians_closed_form():
    # FD of N(mu1, s1^2) and N(mu2, s2^2) is (mu1 - mu2)^2 + (s1 - s2)^2.
    a = three_points_1d(1.0, 2.0)
    b = three_points_1d(-0.5, 0.5)
    assert frechet_distance(a, b) == pytest.approx((1.0 + 0.5) ** 2 + (2.0 - 0.5) ** 2, abs=1e-12)


def test_frechet_diagonal_covariances_closed_form():
    mean_a, offsets_a = np.array([1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5])
    mean_b, offsets_b = np.array([0.0, 0.0, 0.0]), np.array([3.0, 1.0, 0.5])
    a, b = factorial_design(mean_a, offsets_a), factorial_design(mean_b, offsets_b)
    var_a = 8 * offsets_a**2 / 7
    var_b = 8 * offsets_b**2 / 7
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    # By hand: |dmu|^2 = 1 + 4 + 0.25 = 5.25; sum (sd_a - sd_b)^2 = (8/7)(4 + 1 + 0) = 40/7.
    assert expected == pytest.approx(5.25 + 40 / 7)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-10)


def test_frechet_rotated_commuting_covariances():
    # Rotating both sets by the same orthogonal matrix leaves the distance unchanged, and
    # exercises full (non-diagonal) covariances with the same closed-form answer as above.
    angle = math.pi / 6
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = factorial_design(np.array([1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5])) @ rotation.T
    b = factorial_design(np.zeros(3), np.array([3.0, 1.0, 0.5])) @ rotation.T
    assert frechet_distance(a, b) == pytest.approx(5.25 + 40 / 7, abs=1e-10)


def test_frechet_non_commuting_2d_closed_form():
    # Points mean ± u, mean ± v have covariance 2 (uu^T + vv^T) / 3. For 2x2 matrices,
    # Tr((S_a S_b)^(1/2)) = sqrt(Tr(S_a S_b) + 2 sqrt(det S_a det S_b)) (the eigenvalues of
    # S_a S_b are those of a PSD matrix; tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for 2x2 PSD M).
    u_a, v_a = np.array([2.0, 0.0]), np.array([1.0, 1.0])
    u_b, v_b = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    mean_a, mean_b = np.array([0.5, 1.0]), np.array([-1.0, 2.0])
    a = np.stack([mean_a + u_a, mean_a - u_a, mean_a + v_a, mean_a - v_a])
    b = np.stack([mean_b + u_b, mean_b - u_b, mean_b + v_b, mean_b - v_b])
    # By hand: S_a = (2/3) [[5, 1], [1, 1]], S_b = (2/3) [[9, -3], [-3, 2]].
    cov_a = 2 / 3 * np.array([[5.0, 1.0], [1.0, 1.0]])
    cov_b = 2 / 3 * np.array([[9.0, -3.0], [-3.0, 2.0]])
    product = cov_a @ cov_b
    assert not np.allclose(product, cov_b @ cov_a)
    det_a = cov_a[0, 0] * cov_a[1, 1] - cov_a[0, 1] ** 2
    det_b = cov_b[0, 0] * cov_b[1, 1] - cov_b[0, 1] ** 2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(det_a * det_b))
    expected = (1.5**2 + 1.0**2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-10)


def test_frechet_identical_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 8))
    b = rng.normal(loc=0.3, scale=1.5, size=(60, 8))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)


def test_frechet_needs_more_samples_than_dimensions():
    few = np.zeros((3, 3))
    enough = np.arange(12.0).reshape(4, 3) ** 2
    with pytest.raises(ValueError, match=r"more samples than feature dimensions \(n=3, d=3\)"):
        frechet_distance(few, enough)
    with pytest.raises(ValueError, match=r"\(n=3, d=3\)"):
        frechet_distance(enough, few)


# --- KID ----------------------------------------------------------------------------------


def hand_mmd2(a: list[list[float]], b: list[list[float]]) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, pair by pair."""
    d = len(a[0])

    def k(x, y):
        return (sum(p * q for p, q in zip(x, y, strict=True)) / d + 1) ** 3

    n, m = len(a), len(b)
    within_a = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_b = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x, y) for x in a for y in b) / (n * m)
    return within_a + within_b - 2 * across


A3 = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
B3 = [[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]


def test_mmd2_hand_computed():
    # On paper: off-diagonal K_aa all 1 (dot products 0) -> 1; K_bb = 8, 8, 1 -> 17/3;
    # K_ab sums to 3 + 2 * (3.375 + 8 + 1) = 27.75 -> 37/12; 1 + 17/3 - 37/6 = 0.5.
    assert hand_mmd2(A3, B3) == pytest.approx(0.5, abs=1e-12)
    assert mmd2_unbiased(np.array(A3), np.array(B3)) == pytest.approx(0.5, abs=1e-12)


def test_kid_whole_set_subsets():
    # subset_size = 3 = n = m: every subset is the whole set, so the mean is the full
    # estimate and the standard error is 0.
    mean, standard_error = kid(np.array(A3), np.array(B3), subsets=5, subset_size=3)
    assert mean == pytest.approx(hand_mmd2(A3, B3), abs=1e-12)
    assert standard_error == 0.0


def test_mmd2_unequal_sizes_and_capped_subset():
    a = [[0.5, -1.0], [2.0, 1.0], [-1.0, 0.0], [1.5, 1.5]]
    b = [[0.0, 1.0], [1.0, 1.0], [-2.0, 0.5]]
    # Unequal set sizes: the unbiased estimator normalises each block by its own pair count.
    assert mmd2_unbiased(np.array(a), np.array(b)) == pytest.approx(hand_mmd2(a, b), abs=1e-12)
    # subset_size above the sample is capped at min(subset_size, n, m) = 3: the whole sets.
    mean, standard_error = kid(np.array(a[:3]), np.array(b), subsets=4, subset_size=10)
    assert mean == pytest.approx(hand_mmd2(a[:3], b), abs=1e-12)
    assert standard_error == 0.0


def test_kid_same_distribution_near_zero_and_shift_detected():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(300, 16))
    mean, standard_error = kid(a, b, subsets=20, subset_size=100, seed=0)
    assert standard_error > 0
    assert abs(mean) < 3 * standard_error
    shifted, shifted_error = kid(a, b + 1.0, subsets=20, subset_size=100, seed=0)
    assert shifted > 3 * shifted_error


# --- Rater agreement ----------------------------------------------------------------------


def test_cohen_kappa_wikipedia_table():
    # Wikipedia "Cohen's kappa": A yes/B yes 20, A yes/B no 5, A no/B yes 10, A no/B no 15.
    # po = 35/50 = 0.7; pe = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4.
    table = {("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15}
    pairs = [pair for pair, count in table.items() for _ in range(count)]
    rater_a = [p for p, _ in pairs]
    rater_b = [q for _, q in pairs]
    assert agreement(rater_a, rater_b) == pytest.approx(0.7)
    assert cohen_kappa(rater_a, rater_b) == pytest.approx(0.4, abs=1e-12)


def test_cohen_kappa_extremes():
    labels = ["cat", "dog", "cat", "bird", 3]
    assert cohen_kappa(labels, labels) == 1.0
    # Complete disagreement with balanced labels: po = 0, pe = 0.5 -> kappa = -1.
    assert cohen_kappa(["a", "a", "b", "b"], ["b", "b", "a", "a"]) == pytest.approx(-1.0)
    # pe = 1: both raters always say "yes"; kappa is 0/0 and defined as 1.
    assert cohen_kappa(["yes"] * 4, ["yes"] * 4) == 1.0


def test_agreement_and_length_checks():
    assert agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError):
        agreement([1, 2], [1])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


# --- Confidence interval ------------------------------------------------------------------


def test_mean_ci_hand_computed():
    # [1..5]: mean 3; std(ddof=1) = sqrt(10/4); standard error sqrt(2.5/5) = sqrt(0.5);
    # half-width 1.959964 * 0.7071068 = 1.385904.
    mean, low, high = mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert low == pytest.approx(3 - 1.385904, abs=1e-6)
    assert high == pytest.approx(3 + 1.385904, abs=1e-6)
    # 90%: z = 1.644854.
    _, low90, high90 = mean_ci([1, 2, 3, 4, 5], confidence=0.90)
    assert high90 - low90 == pytest.approx(2 * 1.644854 * math.sqrt(0.5), abs=1e-6)


def test_mean_ci_single_value():
    mean, low, high = mean_ci([4.2])
    assert mean == 4.2
    assert math.isnan(low) and math.isnan(high)


# --- CLIPScore ----------------------------------------------------------------------------


def test_clip_score_hand_made_vectors():
    image = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    text = np.array([[0.0, 2.0], [6.0, 8.0], [-1.0, 0.0], [1.0, 0.0]])
    # orthogonal -> 0; same direction (any length) -> 2.5; opposite -> 0 (clipped);
    # 45 degrees -> 2.5 * cos(pi/4).
    expected = [0.0, 2.5, 0.0, 2.5 / math.sqrt(2)]
    np.testing.assert_allclose(clip_score(image, text), expected, atol=1e-12)
