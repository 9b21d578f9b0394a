"""The one scoring function, ``score``: FID, KID, precision / recall, the caption score, exact-match and
per-attribute accuracy and per-attribute histogram distances of images against a ``Reference`` of real
images; ``floor``, ``judge_on_real`` and ``vae_psnr`` score the real images themselves (the ceilings a
generator is read against). Every command that scores images calls ``score``.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import world
from ..images import from_pixels, to_pixels, vae_round_trip
from . import metrics
from .extractors import JudgeExtractor, wanted_indices
from .references import HISTOGRAM_ATTRIBUTES, PROMPT_SEED, Reference, from_features, heldout_samples

SCORED = ("colour", "background", "shape", "size", "position")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_K = 3                  # k of improved precision / recall
KID_SCALE = 1000.0        # KID is reported x 10^3
# object_area: a pixel is the object's when it lies farther than this many RGB levels from the background colour;
# half the closest object-background pair of the world's palette (orange on yellow: 81 levels apart)
AREA_THRESHOLD = 40.0
ROUNDING = {"fid": 3, "kid": 4, "kid_std": 4, "precision": 4, "recall": 4, "caption_score": 3, "exact_match": 4,
            "attribute_accuracy": 4, "histogram_distance": 4, "fid_ci": 3}

_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_UNIT_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
SCORE_PROPERTIES = {
    "fid": {"type": "number", "minimum": 0},
    "kid": {"type": "number", "description": "KID x 10^3: mean over subsets (can be negative)"},
    "kid_std": {"type": "number", "minimum": 0, "description": "KID x 10^3: std over subsets"},
    "precision": _UNIT_OR_NULL,   # null when a set has at most PR_K images
    "recall": _UNIT_OR_NULL,
    "caption_score": {"type": "number", "minimum": 0, "maximum": 100},  # the judge's agreement with the prompt
    "exact_match": _UNIT,         # every attribute the caption names judged right
    "attribute_accuracy": {"type": "object", "additionalProperties": {"type": "number"}},
    "histogram_distance": {"type": "object", "required": list(HISTOGRAM_ATTRIBUTES),
                           "additionalProperties": _UNIT},
    "fid_ci": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}
SCORE_REQUIRED = ["fid", "kid", "kid_std", "precision", "recall", "caption_score", "exact_match",
                  "attribute_accuracy", "histogram_distance"]


def model_images(images) -> torch.Tensor:
    """Images as float [N, 3, H, W] in [-1, 1]: from uint8 [N, H, W, 3] (8-bit images), float32
    [N, 3, H, W] arrays (the decoder's output, cached) or tensors."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if images.dtype == np.uint8:
        return from_pixels(images)
    return torch.from_numpy(np.ascontiguousarray(images)).float()


def object_area(images) -> np.ndarray:
    """Per image [N]: the share of its pixels that belong to the object. The shapes world draws one solid object on
    a solid background, so the background colour is the median of the border pixels and every pixel farther than
    AREA_THRESHOLD RGB levels from it counts (the area the guided ODE inflates at large g)."""
    x = (model_images(images).clamp(-1, 1).numpy().astype(np.float32) + 1.0) * 127.5      # [N, 3, H, W]
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], axis=2)
    background = np.median(border, axis=2)                                                  # [N, 3]
    distance = np.linalg.norm(x - background[:, :, None, None], axis=1)                   # [N, H, W]
    return (distance > AREA_THRESHOLD).mean(axis=(1, 2))


def attribute_accuracy(predicted: list[dict[str, str]], wanted: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute: the share of images whose judged value equals the one the prompt named
    (only images whose prompt names that attribute count)."""
    out = {}
    for key in SCORED:
        hits = [p[key] == w[key] for p, w in zip(predicted, wanted) if key in w]
        if hits:
            out[key] = float(np.mean(hits))
    return out


def judged_values(images, extractor: JudgeExtractor, attribute: str) -> np.ndarray:
    """Per image, the value of ``attribute`` the judge sees (e.g. its colour): an array of strings [N]."""
    return np.array([p[attribute] for p in extractor.predict(model_images(images))])


def score(images, prompts: list[str], extractor: JudgeExtractor, reference: Reference, *,
          wanted: list[dict[str, str]] | None = None, bootstrap: int = 0, paired: bool = False,
          per_image: bool = False) -> dict:
    """The one scoring function: every command that scores images calls it.

    Args:
        images: uint8 [N, H, W, 3], or float [N, 3, H, W] in [-1, 1] (array or tensor), drawn for ``prompts``.
        reference: real images (``reference_set``), for FID, KID, precision / recall and histograms.
        wanted: per image, attribute -> the value it should have (default: what its prompt names).
        bootstrap: resamples of a percentile bootstrap interval of FID (0: none).
        paired: reference image i was drawn for prompt i from seed i too (``reference_from_images`` of another
            sampler's images): KID leaves out each image's own pair (``metrics.kid(paired=True)``).
        per_image: also return "per_image" (``per_image_values``), what sampling intervals resample.

    Returns (unrounded; ``rounded`` rounds for tables):
        fid, kid and kid_std (x 10^3: mean and std over KID_SUBSETS subsets of min(KID_SUBSET_SIZE, N, M)
        rows, on features divided by the reference features' RMS), precision and recall (k = PR_K, against an equal-size random subset of the reference;
        None when N <= PR_K), caption_score (the judge's agreement with the prompt), exact_match (every
        named attribute right), attribute_accuracy, histogram_distance (attribute -> total variation between
        the judge's labels of the images and the reference's labels, for HISTOGRAM_ATTRIBUTES), and fid_ci
        [lower, upper] with ``bootstrap``.
    """
    x = model_images(images)
    features = extractor.features(x)
    probs = extractor.probabilities(x)
    predicted = extractor.predict_from(probs)
    if wanted is None:
        wanted = [world.parse_caption(p) for p in prompts]
    n = min(len(features), len(reference.features))
    if n > PR_K:
        pick = np.sort(np.random.default_rng(0).choice(len(reference.features), n, replace=False))
        precision, recall = metrics.precision_recall(reference.features[pick], features, PR_K)
    else:
        precision = recall = None
    out = {**distances(features, reference, paired), "precision": precision, "recall": recall,
           "caption_score": metrics.attribute_agreement(probs, wanted_indices(prompts)),
           "exact_match": metrics.exact_accuracy(predicted, wanted),
           "attribute_accuracy": attribute_accuracy(predicted, wanted),
           "histogram_distance": {k: metrics.histogram_distance([p[k] for p in predicted], list(reference.labels[k]),
                                                                world.ATTRIBUTES[k])
                                  for k in HISTOGRAM_ATTRIBUTES}}
    if bootstrap:
        _, lower, upper = metrics.bootstrap_ci(features, reference.features, metrics.fid, num_resamples=bootstrap)
        out["fid_ci"] = [lower, upper]
    if per_image:
        out["per_image"] = per_image_values(features, probs, predicted, prompts, wanted)
    return out


def distances(features: np.ndarray, reference: Reference, paired: bool = False) -> dict:
    """{"fid", "kid", "kid_std"} of judge ``features`` [N, D] against ``reference`` (``score``'s, which calls it; a
    caller that already holds the features scores another reference without a second judge pass)."""
    mu, sigma = metrics.gaussian_stats(features)
    # the cubic kernel depends on the feature scale: scale both sets by the reference's RMS per dimension
    # (one fixed linear map, so rows stay comparable; Inception-like magnitudes)
    scale = kid_scale(reference.features)
    kid_mean, kid_std = metrics.kid(features.astype(np.float64) / scale, reference.features.astype(np.float64) / scale,
                                    KID_SUBSETS, KID_SUBSET_SIZE, paired=paired)  # float64: no jitter between runs
    return {"fid": metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma),
            "kid": KID_SCALE * kid_mean, "kid_std": KID_SCALE * kid_std}


def kid_scale(reference_features: np.ndarray) -> float:
    """The feature scale KID is computed at: the reference features' RMS (1 when they are all 0)."""
    return float(np.sqrt(np.mean(np.asarray(reference_features, np.float64) ** 2))) or 1.0


def per_image_values(features: np.ndarray, probs: dict, predicted: list[dict], prompts: list[str],
                     wanted: list[dict[str, str]]) -> dict:
    """What ``score``'s means and set metrics are made of, one entry per image (the sampling intervals resample
    these): features [N, D] (FID, KID), caption_score [N] (NaN where the caption names nothing), exact_match [N]
    (0 / 1) and attribute_accuracy {attribute: [N]} (1 right, 0 wrong, NaN where the caption leaves it open)."""
    return {"features": np.asarray(features, np.float32),
            "caption_score": metrics.agreement_per_image(probs, wanted_indices(prompts)),
            "exact_match": np.array([float(all(p[k] == v for k, v in w.items())) for p, w in zip(predicted, wanted)]),
            "attribute_accuracy": {k: np.array([float(p[k] == w[k]) if k in w else np.nan
                                                for p, w in zip(predicted, wanted)])
                                   for k in SCORED if any(k in w for w in wanted)}}


def reference_from_images(images, extractor: JudgeExtractor, name: str) -> Reference:
    """Generated images as a reference set (``references.from_features``): the judge's features of ``images``
    and its labels of the HISTOGRAM_ATTRIBUTES. Scoring a model's samples against it (``score``) measures how
    close they come to those images, e.g. an LCM's to its teacher's guided ODE on the same prompts and seeds
    (distillation fidelity); image i of ``images`` belongs to prompt i."""
    x = model_images(images)
    labels = {k: judged_values(x, extractor, k) for k in HISTOGRAM_ATTRIBUTES}
    return from_features(extractor.features(x), labels, name, kind="generated")


def rounded(scores: dict) -> dict:
    """``score``'s values rounded as the tables print them (ROUNDING digits)."""
    def rnd(value, digits):
        if value is None:
            return None
        if isinstance(value, dict):
            return {k: rnd(v, digits) for k, v in value.items()}
        if isinstance(value, list):
            return [rnd(v, digits) for v in value]
        return round(float(value), digits)
    return {k: rnd(v, ROUNDING[k]) if k in ROUNDING else v for k, v in scores.items()}


def floor(extractor: JudgeExtractor, reference: Reference, num_samples: int, split: str = "heldout",
          bootstrap: int = 0) -> dict:
    """The scores of the real images the prompts were written from, at the rows' n: what a perfect
    generator scores (FID's small-sample bias; with the "prompt-scenes" reference these images are
    inside the reference set, so KID and FID come out lower than an independent set would give)."""
    samples = heldout_samples(num_samples, split=split)
    scores = score(world.images_array(samples), [s.text for s in samples], extractor, reference,
                   bootstrap=bootstrap)
    return {**rounded(scores), "num_samples": num_samples}


def judge_on_real(extractor: JudgeExtractor, reference: Reference, count: int = 1000,
                  seed: int = PROMPT_SEED) -> dict[str, float]:
    """The judge's own accuracy on real held-out images, every attribute (its ceiling)."""
    samples = heldout_samples(count, seed)
    return score(world.images_array(samples), [s.text for s in samples], extractor, reference,
                 wanted=[s.scene.attributes() for s in samples])["attribute_accuracy"]


def kid_text(record: dict, digits: int = 2) -> str:
    """KID x 10^3 of a scored record as the tables print it: with a sampling interval (``comparisons``'
    "intervals", or "kid_ci") the value and its 95% interval; without one, the mean over reference subsets and
    their sd, named as such, because that spread covers the reference's subsampling alone (no "±")."""
    fmt = f"{{:.{digits}f}}"
    if "intervals" in record:
        value, (lo, hi) = record["intervals"]["kid"]["value"], record["intervals"]["kid"]["ci"]
    elif "kid_ci" in record:
        value, (lo, hi) = record["kid"], record["kid_ci"]
    else:
        return f"{fmt.format(record['kid'])} (subset sd {fmt.format(record['kid_std'])})"
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"


@torch.no_grad()
def vae_psnr(vae, count: int = 512, seed: int = PROMPT_SEED, batch_size: int = 128) -> float:
    """Mean reconstruction PSNR (dB, 8-bit images) on held-out world images."""
    real = world.images_array(heldout_samples(count, seed))  # [N, H, W, 3] uint8
    rec = to_pixels(vae_round_trip(vae, from_pixels(real), batch_size))  # [N, H, W, 3] uint8
    mse = (torch.from_numpy(rec).double() - torch.from_numpy(real).double()).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean())


__all__ = ["score", "rounded", "kid_text", "kid_scale", "per_image_values", "reference_from_images", "floor", "judge_on_real", "vae_psnr", "attribute_accuracy", "model_images", "judged_values", "object_area", "distances",
           "SCORED", "SCORE_PROPERTIES", "SCORE_REQUIRED", "ROUNDING"]
