"""Reference sets: the held-out prompts and real images every row is scored against.

* ``heldout_samples`` / ``heldout_prompts``: the world samples (PROMPT_SEED) whose captions are the prompts.
* ``reference_set``: ``count`` real images as the scorer needs them (``Reference``: features, their Gaussian
  fit and per-attribute labels), cached as .npz named after the extractor and its version.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import world
from ..files import atomic_path
from ..images import from_pixels
from . import metrics

PROMPT_SEED = 99          # world seed of the held-out prompts (prompt i: sample i of this seed)
REFERENCE_COUNT = 2000    # real images in a reference set
# The independent reference starts at this sample index of PROMPT_SEED: no prompt index (< 100000,
# the CLI's limit) reaches it, so its scenes are disjoint from every prompt's.
INDEPENDENT_START = 1_000_000
REFERENCE_KINDS = ("prompt-scenes", "independent")
HISTOGRAM_ATTRIBUTES = ("size", "position")  # the judge's labels of samples vs the reference's, per attribute


def heldout_samples(count: int, seed: int = PROMPT_SEED, split: str = "heldout") -> list[world.Sample]:
    """The real world samples the evaluation prompts are the captions of."""
    return list(world.iter_samples(seed, count, split))


def heldout_prompts(count: int, seed: int = PROMPT_SEED, split: str = "heldout") -> list[tuple[str, dict[str, str]]]:
    """Held-out captions (held-out templates and attribute triples) with what they ask for."""
    return [(s.text, world.parse_caption(s.text)) for s in heldout_samples(count, seed, split)]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LATENTCM_CACHE", Path.home() / ".cache" / "latentcm"))


@dataclass
class Reference:
    """Real images as the scorer needs them: features [M, D] (KID, precision / recall), their Gaussian
    fit (FID) and per-attribute labels [M] (histogram distances)."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    labels: dict[str, np.ndarray]
    path: Path
    kind: str = "prompt-scenes"

    @property
    def name(self) -> str:
        return self.path.name


def cached_reference(path: Path, make, kind: str) -> Reference:
    """The Reference stored at ``path`` (.npz), made once by ``make() -> (features, {attribute: labels})``
    when missing (or when an older cache holds only mu and sigma)."""
    path = Path(path)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if "features" in f.files:
                labels = {k.removeprefix("label_"): f[k] for k in f.files if k.startswith("label_")}
                return Reference(f["features"], f["mu"], f["sigma"], labels, path, kind)
    features, labels = make()
    features = np.asarray(features)
    mu, sigma = metrics.gaussian_stats(features)
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, features=features,
                 **{f"label_{k}": np.asarray(v, dtype=str) for k, v in labels.items()})
    return Reference(features, mu, sigma, {k: np.asarray(v, dtype=str) for k, v in labels.items()}, path, kind)


def from_features(features: np.ndarray, labels: dict[str, np.ndarray], name: str,
                  kind: str = "generated") -> Reference:
    """A Reference of given features [M, D] and per-attribute labels [M] (not cached): e.g. generated
    images (``scoring.reference_from_images``) that other samples are scored against."""
    features = np.asarray(features)
    mu, sigma = metrics.gaussian_stats(features)
    return Reference(features, mu, sigma, {k: np.asarray(v, dtype=str) for k, v in labels.items()}, Path(name), kind)


def reference_set(extractor, kind: str = "prompt-scenes", count: int | None = None, split: str = "heldout",
                  cache_dir: Path | None = None, seed: int = PROMPT_SEED) -> Reference:
    """``count`` (default REFERENCE_COUNT) real images of ``split``, cached as .npz named after the
    extractor and its version (a retrained judge never reuses stale features).

    kind "prompt-scenes": samples 0..count-1 of the prompts' world seed, the committed reports' reference;
    it holds the very scenes the first ``count`` prompts were written from. "independent": samples from
    index INDEPENDENT_START on, disjoint from every prompt's scene.
    """
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"unknown reference {kind!r}; use one of {', '.join(REFERENCE_KINDS)}")
    count = REFERENCE_COUNT if count is None else count
    start = INDEPENDENT_START if kind == "independent" else 0
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = f"-from{start}" if start else ""
    path = folder / f"reference-{split}-{extractor.name}-{extractor.version}-n{count}-s{seed}{suffix}.npz"

    def make():
        samples = list(world.iter_samples(seed, count, split, start=start))
        features = extractor.features(from_pixels(world.images_array(samples)))
        return features, {k: [s.scene.attributes()[k] for s in samples] for k in HISTOGRAM_ATTRIBUTES}
    return cached_reference(path, make, kind)


__all__ = ["Reference", "reference_set", "cached_reference", "from_features", "heldout_prompts", "heldout_samples",
           "default_cache_dir", "PROMPT_SEED", "REFERENCE_COUNT", "INDEPENDENT_START", "REFERENCE_KINDS",
           "HISTOGRAM_ATTRIBUTES"]
