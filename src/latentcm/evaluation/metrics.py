"""Image-generation metrics as pure functions of features (numpy in, float out).

No models and no I/O here: extractors (``evaluation.extractors``) turn images into the arrays
these functions take, so the same FID serves judge features, Inception features or anything else.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg


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
    per_image = []
    for i, want in enumerate(wanted):
        if want:
            per_image.append(np.mean([probs[key][i, idx] for key, idx in want.items()]))
    if not per_image:
        raise ValueError("no caption names any attribute")
    return float(100.0 * np.mean(per_image))


def exact_accuracy(predicted: list[dict[str, str]], wanted: list[dict[str, str]]) -> float:
    """Share of images whose every attribute the caption names is judged right."""
    if not wanted:
        raise ValueError("no images")
    return float(np.mean([all(p[k] == v for k, v in w.items()) for p, w in zip(predicted, wanted)]))
