"""Adaptation measured with the harness: models sampled on the striped set's held-out captions.

Per model and step count: FID to real held-out striped images (judge features), style accuracy
(the style judge), exact attribute accuracy and the caption score (the judge). Samples are
cached like ``lcm evaluate``'s.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import styles
from ..images import save_grid, vae_round_trip
from . import pipeline as harness
from .extractors import JudgeExtractor
from .style import StyleJudge

REFERENCE_SEED = 99


def striped_prompts(count: int, seed: int = REFERENCE_SEED) -> list[str]:
    return [styles.make_styled_sample(seed, i, "heldout").text for i in range(count)]


def striped_reference(extractor: JudgeExtractor, count: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(cache_dir) / f"reference-striped-heldout-{extractor.name}-{extractor.version}-n{count}.npz"

    def features():
        x = np.stack([np.asarray(styles.make_styled_sample(REFERENCE_SEED + 1, i, "heldout").image)
                      for i in range(count)])
        return extractor.features(harness._pixels(x))
    return harness.cached_stats(path, features)


def _scores(x, prompts: list[str], extractor: JudgeExtractor, reference: tuple, style_judge: StyleJudge) -> dict:
    """fid, style_accuracy, accuracy, clip_score and attribute_accuracy of images [N, 3, H, W] in [-1, 1]."""
    scored = harness.score_pixels(x, prompts, extractor, reference)
    return {"fid": scored["fid"], "style_accuracy": round(float(style_judge.is_striped(x).mean()), 4),
            **{k: scored[k] for k in ("accuracy", "clip_score", "attribute_accuracy")}}


def evaluate_models(bundles: dict, extractor: JudgeExtractor, style_judge: StyleJudge, out: Path,
                    steps: tuple[int, ...] = (1, 2, 4), num_samples: int = 256, guidance: float = 8.5, seed: int = 0,
                    reference_count: int = 1000, cache_dir: Path | None = None) -> dict[str, list[dict]]:
    """{model name: [one record per step count]} with steps, fid, style_accuracy, accuracy, clip_score, seconds."""
    out = Path(out)
    prompts = striped_prompts(num_samples)
    reference = striped_reference(extractor, reference_count, cache_dir or harness.default_cache_dir())
    results = {}
    for name, bundle in bundles.items():
        records = []
        for n in steps:
            row = harness.Row(name, "lcm", n, guidance)
            images, timing = harness.generate_cached(bundle, row, prompts, seed, out / "samples")
            x = harness._pixels(images)
            save_grid(x[:32], out / "grids" / f"{row.key}.png")
            records.append({"steps": n, **_scores(x, prompts, extractor, reference, style_judge), **timing})
        results[name] = records
    return results


def ceilings(extractor: JudgeExtractor, style_judge: StyleJudge, vae, num_samples: int = 256,
             reference_count: int = 1000, cache_dir: Path | None = None) -> dict[str, dict]:
    """The same metrics on real held-out striped images (other seeds than the FID reference) and on their
    VAE round trips: what a perfect model scores, and what one whose images leave through this VAE can."""
    reference = striped_reference(extractor, reference_count, cache_dir or harness.default_cache_dir())
    samples = [styles.make_styled_sample(REFERENCE_SEED, i, "heldout") for i in range(num_samples)]
    real = harness._pixels(np.stack([np.asarray(s.image) for s in samples]))
    prompts = [s.text for s in samples]
    return {name: _scores(x, prompts, extractor, reference, style_judge)
            for name, x in (("real", real), ("vae_round_trip", vae_round_trip(vae, real)))}


def markdown(results: dict[str, list[dict]], labels: dict[str, str] | None = None,
             ceiling: dict[str, dict] | None = None) -> str:
    labels = labels or {}
    lines = ["| model | steps | FID to striped held-out | style accuracy | exact attribute accuracy | caption score |",
             "|---|---|---|---|---|---|"]
    names = {"real": "real held-out striped images", "vae_round_trip": "their VAE round trips"}
    for name, r in (ceiling or {}).items():
        lines.append(f"| *{names.get(name, name)}* | - | {r['fid']:.2f} | {r['style_accuracy']:.1%} | "
                     f"{r['accuracy']:.1%} | {r['clip_score']:.1f} |")
    for name, records in results.items():
        for r in records:
            lines.append(f"| {labels.get(name, name)} | {r['steps']} | {r['fid']:.2f} | {r['style_accuracy']:.1%} | "
                         f"{r['accuracy']:.1%} | {r['clip_score']:.1f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict, extra: dict, labels: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**results, **extra}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results, labels, extra.get("ceilings")))


__all__ = ["ceilings", "evaluate_models", "markdown", "write", "striped_prompts"]
