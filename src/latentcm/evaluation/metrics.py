"""Image-generation metrics as pure functions of features (numpy in, float out).

No models and no I/O here: extractors (``evaluation.extractors``) turn images into the arrays
these functions take, so the same FID serves judge features, Inception features or anything else.

FID is biased upwards at small sample sizes; ``kid`` (unbiased), ``bootstrap_ci`` (an interval for
any of them), ``precision_recall`` (fidelity and coverage apart) and ``histogram_distance``
(per-attribute label distributions) are the ones to read when there are hundreds of samples.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import linalg

# Largest Gram matrices kid builds whole (float64 elements, all three together: 128 MiB); above
# this, or where it would cost more, it computes each subset's kernels on its own.
_KID_GRAM_MAX = 2**24
# Most float64 elements in one block of pairwise distances (precision_recall): 32 MiB.
_DIST_BLOCK = 2**22


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased) of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID, Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    A singular product (fewer samples than dimensions) is regularised with eps * I, as in the
    reference implementation; the tiny imaginary part sqrtm may return is dropped.
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(len(sigma1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
    """CLIP score (Hessel et al. 2021): 100 * mean over pairs of max(cos(image_i, text_i), 0)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(100.0 * np.clip(cos, 0.0, None).mean())


def attribute_agreement(probs: dict[str, np.ndarray], wanted: list[dict[str, int]]) -> float:
    """The CLIP-score analogue on the shapes world: 100 * mean over images of the judge's mean
    probability of each attribute value the caption names.

    Args:
        probs: attribute -> [N, K] class probabilities of the N images.
        wanted: per image, attribute -> class index the caption asks for (attributes it omits are absent).
    """
    per_image = agreement_per_image(probs, wanted)
    if np.isnan(per_image).all():
        raise ValueError("no caption names any attribute")
    return float(np.nanmean(per_image))


def agreement_per_image(probs: dict[str, np.ndarray], wanted: list[dict[str, int]]) -> np.ndarray:
    """``attribute_agreement`` of each image [N] (100 * the judge's mean probability of the values its caption
    names); NaN for an image whose caption names no attribute."""
    return np.array([100.0 * np.mean([probs[key][i, idx] for key, idx in want.items()]) if want else np.nan
                     for i, want in enumerate(wanted)])


def exact_accuracy(predicted: list[dict[str, str]], wanted: list[dict[str, str]]) -> float:
    """Share of images whose every attribute the caption names is judged right."""
    if not wanted:
        raise ValueError("no images")
    return float(np.mean([all(p[k] == v for k, v in w.items()) for p, w in zip(predicted, wanted)]))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel k(x, y) = (x.y / D + 1)^3 of x [N, D] and y [M, D]: [N, M]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need {name} [N >= 2, D], got shape {f.shape}")
    return f


def kid(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, paired: bool = False) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
    estimator of MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3,

        sum_{i != j} [k(a_i, a_j) + k(b_i, b_j)] / (s (s-1)) - 2 sum_{i, j} k(a_i, b_j) / s^2,

    on num_subsets random subsets of s = min(subset_size, N, M) rows drawn without replacement
    from each of features_a [N, D] and features_b [M, D].

    Unlike FID its expectation is the population value (0 for one distribution), whatever the
    sample size; single values can be negative. Returns (mean, std over the subsets); the std
    measures subset-to-subset spread, not the error of the mean.

    ``paired``: row i of a and row i of b belong together (N == M; e.g. two samplers' images from one prompt and
    seed), which makes them dependent: the subsets take the same rows of both, and the cross term leaves out
    each row's own pair, sum_{i != j} k(a_i, b_j) / (s (s-1)) (Gretton et al. 2012, Eq. 3), so that identical
    sets score exactly 0 and the estimate stays unbiased for the two marginal distributions.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    n, m, s = len(a), len(b), min(subset_size, len(a), len(b))
    if s < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    if paired and n != m:
        raise ValueError(f"paired sets need as many rows: {n} vs {m}")
    rng = np.random.default_rng(seed)
    idx_a = np.argsort(rng.random((num_subsets, n)), axis=1)[:, :s]
    idx_b = idx_a if paired else np.argsort(rng.random((num_subsets, m)), axis=1)[:, :s]
    gram = n * n + m * m + n * m
    if gram <= _KID_GRAM_MAX and gram * (a.shape[1] + num_subsets) < 3 * num_subsets * s * s * a.shape[1]:
        values = _kid_from_gram(a, b, idx_a, idx_b, paired)
    else:
        values = np.array([_mmd2_unbiased(a[ia], b[ib], paired) for ia, ib in zip(idx_a, idx_b)])
    return float(values.mean()), float(values.std())


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, paired: bool = False) -> float:
    """Unbiased MMD^2 of x [S, D] and y [S, D] with the cubic kernel (``paired``: row i of x and y a pair)."""
    s = len(x)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (s * (s - 1))
    cross = (kxy.sum() - np.trace(kxy)) / (s * (s - 1)) if paired else kxy.mean()
    return within - 2.0 * cross


def _kid_from_gram(a: np.ndarray, b: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray,
                   paired: bool = False) -> np.ndarray:
    """Unbiased MMD^2 [P] of the P subsets idx_a [P, S] of a and idx_b [P, S] of b, from the full
    Gram matrices: a subset's kernel sum is u^T K v with 0/1 indicator rows u, v [P, N] (``paired``: idx_a is
    idx_b and the cross term leaves out the pairs' diagonal)."""
    p, s = idx_a.shape
    rows = np.arange(p)[:, None]
    ua, ub = np.zeros((p, len(a))), np.zeros((p, len(b)))
    ua[rows, idx_a] = 1.0
    ub[rows, idx_b] = 1.0
    kaa, kbb = _poly_kernel(a, a), _poly_kernel(b, b)
    xx = ((ua @ kaa) * ua).sum(1) - ua @ np.diag(kaa)
    yy = ((ub @ kbb) * ub).sum(1) - ub @ np.diag(kbb)
    kab = _poly_kernel(a, b)
    xy = ((ua @ kab) * ub).sum(1)
    if paired:
        return (xx + yy - 2.0 * (xy - ua @ np.diag(kab))) / (s * (s - 1))
    return (xx + yy) / (s * (s - 1)) - 2.0 * xy / (s * s)


def bootstrap_ci(values_a: np.ndarray, values_b: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                 num_resamples: int = 200, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap (Efron & Tibshirani 1993) of statistic(a, b) -> float, e.g. ``fid`` or
    ``lambda a, b: kid(a, b)[0]``, over the rows of values_a [N, ...] and values_b [M, ...].

    Returns (statistic on the full sets, lower, upper): the alpha/2 and 1 - alpha/2 percentiles
    of the statistic on num_resamples pairs of sets, each set's N (M) rows drawn with replacement
    independently. Costs num_resamples + 1 evaluations of the statistic.

    Resampling with replacement duplicates rows, and duplicates bias set statistics upwards:
    a resample of N rows holds about 0.632 N distinct ones, so FID's bootstrap is biased upwards
    (its small-sample bias grows) and for alike sets the whole interval can lie above the point
    estimate. KID's bootstrap is biased upwards too: its within-set pairs i != j now pair copies
    of one row, adding (mean k(x, x) - mean k(x, x')) / N per set. Read the interval as the
    spread of the statistic, not as an unbiased range for it.
    """
    a, b = np.asarray(values_a), np.asarray(values_b)
    if num_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need num_resamples >= 1 and 0 < alpha < 1, got {num_resamples}, {alpha}")
    rng = np.random.default_rng(seed)
    stats = [statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
             for _ in range(num_resamples)]
    lower, upper = np.percentile(stats, [100.0 * alpha / 2, 100.0 * (1.0 - alpha / 2)])
    return float(statistic(a, b)), float(lower), float(upper)


def _sq_dist_blocks(x: np.ndarray, y: np.ndarray):
    """Yield (start, squared Euclidean distances [B, M]) of row blocks x[start:start + B] to y [M, D]."""
    yy = (y * y).sum(1)
    step = max(1, _DIST_BLOCK // len(y))
    for start in range(0, len(x), step):
        xb = x[start:start + step]
        yield start, np.maximum((xb * xb).sum(1)[:, None] + yy[None, :] - 2.0 * xb @ y.T, 0.0)


def _knn_radii_sq(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance [N] from each row of x [N, D] to its k-th nearest other row."""
    radii = np.empty(len(x))
    for start, d2 in _sq_dist_blocks(x, x):
        d2[np.arange(len(d2)), start + np.arange(len(d2))] = np.inf  # not its own neighbour
        radii[start:start + len(d2)] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return radii


def _inside_balls(points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray) -> float:
    """Share of points [N, D] within some ball (centres [M, D], squared radii [M])."""
    inside = np.zeros(len(points), dtype=bool)
    for start, d2 in _sq_dist_blocks(points, centres):
        inside[start:start + len(d2)] = (d2 <= radii_sq[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features real [N, D] and fake [M, D].

    Each set's manifold is the union of balls around its rows reaching their k-th nearest other
    row. Precision is the share of fake rows inside the real manifold (fidelity), recall the share
    of real rows inside the fake manifold (coverage). Distances go in row blocks, O(block * N) memory.
    """
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if not 1 <= k < min(len(r), len(f)):
        raise ValueError(f"need 1 <= k < min(N, M) = {min(len(r), len(f))}, got {k}")
    precision = _inside_balls(f, r, _knn_radii_sq(r, k))
    recall = _inside_balls(r, f, _knn_radii_sq(f, k))
    return precision, recall


def histogram(labels: Sequence, categories: Sequence) -> np.ndarray:
    """Frequencies [K] of the K categories among labels (each must be one of them); sums to 1."""
    index = {c: i for i, c in enumerate(categories)}
    if len(labels) == 0:
        raise ValueError("no labels")
    unknown = set(labels) - set(index)
    if unknown:
        raise ValueError(f"labels outside the categories: {sorted(map(str, unknown))}")
    counts = np.bincount([index[x] for x in labels], minlength=len(index))
    return counts / counts.sum()


def histogram_distance(labels_a: Sequence, labels_b: Sequence, categories: Sequence) -> float:
    """Total variation distance, 0.5 * sum_k |p_k - q_k| in [0, 1], between the category histograms
    of two label lists: e.g. the sizes or positions a judge reads off generated versus real images
    (a per-attribute check). Total variation as in Levin, Peres & Wilmer, "Markov Chains and
    Mixing Times" (2009), ch. 4: 0 for equal histograms, 1 for disjoint supports."""
    return float(0.5 * np.abs(histogram(labels_a, categories) - histogram(labels_b, categories)).sum())
