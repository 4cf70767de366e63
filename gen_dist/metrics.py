"""Sample-quality metrics on feature vectors: FID, KID, precision/recall on k-NN manifolds, and the Inception
Score on class logits.

All statistics are float64. Features come from an extractor (Inception-v3 or a domain classifier) as (N, D)
arrays; gathering them across ranks is the caller's job, so each function sees the whole set."""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    tr((S1 S2)^1/2) is taken as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which is
    symmetric positive semi-definite: no complex parts to discard and no blow-up on singular covariances
    (fewer samples than dimensions), where a general matrix square root (scipy's sqrtm) needs an offset."""
    r = _psd_sqrt(sigma1)
    inner = r @ sigma2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 estimate with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets; returns (mean, std over subsets)."""
    x, y = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        scores.append(off - 2 * kxy.mean())
    return float(np.mean(scores)), float(np.std(scores))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


BLOCK = 1024
"""Rows per block of the pairwise distances: 10k x 10k float64 distances would take 800 MB at once."""


def _knn_radii(f: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row."""
    # Column 0 of each sorted row is the point itself.
    return np.concatenate([np.partition(_distances(f[i : i + BLOCK], f), k, axis=1)[:, k]
                           for i in range(0, len(f), BLOCK)])


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Share of `points` within the radius of at least one centre."""
    hits = [(_distances(points[i : i + BLOCK], centres) <= radii[None, :]).any(axis=1)
            for i in range(0, len(points), BLOCK)]
    return float(np.concatenate(hits).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): precision is the share of fake samples inside
    the real manifold (the union of balls to each real sample's k-th neighbour), recall the share of real
    samples inside the fake manifold."""
    x, y = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if min(len(x), len(y)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    return _inside(y, x, _knn_radii(x, k)), _inside(x, y, _knn_radii(y, k))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from class logits, as (mean, std) over `splits` parts of the samples."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    parts = []
    for part in np.array_split(logp, min(splits, len(logp))):
        log_py = np.log(np.exp(part).mean(axis=0))
        parts.append(np.exp((np.exp(part) * (part - log_py)).sum(axis=1).mean()))
    return float(np.mean(parts)), float(np.std(parts))
