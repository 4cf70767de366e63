"""FID, KID and precision/recall on feature vectors: known values, self-distance, monotonic in added noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from gen_dist.metrics import feature_stats, fid, frechet_distance, kid, precision_recall


def _features(n: int = 2000, d: int = 32, seed: int = 0) -> np.ndarray:
    """n samples (drawn with `seed`) of one fixed correlated Gaussian in d dimensions."""
    fixed = np.random.default_rng(12345)
    mix, mean = fixed.normal(size=(d, d)) / np.sqrt(d), fixed.normal(size=d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + mean


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = _features()
    assert abs(fid(f, f)) < 1e-8


def test_fid_matches_the_closed_form_for_gaussians() -> None:
    """Diagonal covariances commute: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_agrees_with_scipy_sqrtm_and_stays_real_when_singular() -> None:
    x, y = _features(seed=1), _features(seed=2)
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert fid(x, y) == pytest.approx(reference, rel=1e-8)
    few = fid(x[:10], y[:10])  # 10 samples in 32 dimensions: rank-deficient covariances
    assert np.isfinite(few) and few >= 0


def test_fid_grows_with_noise() -> None:
    f = _features()
    rng = np.random.default_rng(3)
    scores = [fid(f, f + s * rng.normal(size=f.shape)) for s in (0.0, 0.1, 0.3, 1.0)]
    assert scores[0] < 1e-8 and all(a < b for a, b in zip(scores, scores[1:], strict=False))


def test_kid_is_unbiased_near_zero_for_the_same_distribution_and_grows_with_noise() -> None:
    x, y = _features(seed=4), _features(seed=5)
    same, _ = kid(x, y, subsets=20, subset_size=500)
    assert abs(same) < 0.05
    shifted, _ = kid(x, y + 1.0, subsets=20, subset_size=500)
    assert shifted > 10 * abs(same)


def test_precision_recall_see_mode_collapse() -> None:
    real = _features(n=600, seed=6)
    assert precision_recall(real, _features(n=600, seed=7)) > (0.8, 0.8)
    collapsed = real[:5].repeat(120, axis=0) + 1e-3  # every fake sample near one of 5 real ones
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.2


def test_inception_score_spans_one_to_the_number_of_classes() -> None:
    """Confident predictions spread evenly over K classes score K; one class for every sample scores 1."""
    from gen_dist.metrics import inception_score

    confident = np.eye(10)[np.arange(1000) % 10] * 50
    assert inception_score(confident)[0] == pytest.approx(10, rel=1e-6)
    assert inception_score(np.tile(confident[:1], (1000, 1)))[0] == pytest.approx(1, rel=1e-6)
    unsure = np.random.default_rng(0).normal(size=(1000, 10)) * 0.1
    assert 1 < inception_score(unsure)[0] < 1.1


def test_precision_recall_in_blocks_equals_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import gen_dist.metrics as m

    real, fake = _features(300, seed=1), _features(200, seed=2) * 1.2
    whole = m.precision_recall(real, fake)
    monkeypatch.setattr(m, "BLOCK", 7)
    assert m.precision_recall(real, fake) == whole
