"""Adaptation measured with the evaluation pipeline: models sampled on the striped set's held-out captions.

Per model and step count, through ``pipeline.generate_and_score``: FID and KID to real held-out
striped images (judge features; the reference's seed differs from the prompts', so it is an
independent set), style accuracy (the style judge), exact attribute accuracy and the caption score
(the judge), precision / recall and histogram distances. Samples are cached like ``lcm evaluate``'s.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import styles
from ..defaults import LCM_GUIDANCE, LCM_SAMPLER
from ..files import write_text
from ..images import save_grid, vae_round_trip
from . import pipeline, references, scoring
from .results import write_results
from .extractors import JudgeExtractor
from .style import StyleJudge

REFERENCE_SEED = 99


def striped_prompts(count: int, seed: int = REFERENCE_SEED) -> list[str]:
    return [styles.make_styled_sample(seed, i, "heldout").text for i in range(count)]


def striped_reference(extractor: JudgeExtractor, count: int, cache_dir: Path) -> references.Reference:
    """Real held-out striped images of seed REFERENCE_SEED + 1 (the prompts are seed REFERENCE_SEED's)."""
    path = Path(cache_dir) / f"reference-striped-heldout-{extractor.name}-{extractor.version}-n{count}.npz"

    def make():
        samples = [styles.make_styled_sample(REFERENCE_SEED + 1, i, "heldout") for i in range(count)]
        features = extractor.features(scoring.model_images(np.stack([np.asarray(s.image) for s in samples])))
        return features, {k: [s.scene.attributes()[k] for s in samples] for k in references.HISTOGRAM_ATTRIBUTES}
    return references.cached_reference(path, make, "independent")


def _scores(images, prompts: list[str], extractor: JudgeExtractor, reference: references.Reference,
            style_judge: StyleJudge, scored: dict | None = None) -> dict:
    """``scoring.score`` (rounded; ``scored`` when already computed) of images, with style_accuracy."""
    x = scoring.model_images(images)
    scored = scoring.score(x, prompts, extractor, reference) if scored is None else scored
    r = scoring.rounded(scored)
    return {"fid": r.pop("fid"), "style_accuracy": round(float(style_judge.is_striped(x).mean()), 4),
            **{k: r.pop(k) for k in ("exact_match", "caption_score", "attribute_accuracy")}, **r}


def evaluate_models(bundles: dict, extractor: JudgeExtractor, style_judge: StyleJudge, out: Path,
                    steps: tuple[int, ...] = (1, 2, 4), num_samples: int = pipeline.NUM_SAMPLES,
                    guidance: float = LCM_GUIDANCE, seed: int = 0,
                    reference_count: int = 1000, cache_dir: Path | None = None) -> dict[str, list[dict]]:
    """{model name: [one record per step count]} with steps, fid, style_accuracy, exact_match, caption_score, seconds."""
    out = Path(out)
    prompts = striped_prompts(num_samples)
    reference = striped_reference(extractor, reference_count, cache_dir or references.default_cache_dir())
    results = {}
    for name, bundle in bundles.items():
        records = []
        for n in steps:
            row = pipeline.Row(name, LCM_SAMPLER, n, guidance)
            scored, images, timing = pipeline.generate_and_score(bundle, row, prompts, extractor, reference,
                                                                 out / "samples", seed=seed)
            save_grid(scoring.model_images(images[:32]), out / "grids" / f"{row.key}.png")
            records.append({"steps": n, **_scores(images, prompts, extractor, reference, style_judge, scored),
                            **timing})
        results[name] = records
    return results


def ceilings(extractor: JudgeExtractor, style_judge: StyleJudge, vae, num_samples: int = 256,
             reference_count: int = 1000, cache_dir: Path | None = None) -> dict[str, dict]:
    """The same metrics on real held-out striped images (other seeds than the FID reference) and on their
    VAE round trips: what a perfect model scores, and what one whose images leave through this VAE can."""
    reference = striped_reference(extractor, reference_count, cache_dir or references.default_cache_dir())
    samples = [styles.make_styled_sample(REFERENCE_SEED, i, "heldout") for i in range(num_samples)]
    real = scoring.model_images(np.stack([np.asarray(s.image) for s in samples]))
    prompts = [s.text for s in samples]
    return {name: _scores(x, prompts, extractor, reference, style_judge)
            for name, x in (("real", real), ("vae_round_trip", vae_round_trip(vae, real)))}


def markdown(results: dict[str, list[dict]], labels: dict[str, str] | None = None,
             ceiling: dict[str, dict] | None = None) -> str:
    labels = labels or {}
    lines = ["| model | steps | FID to striped held-out | KID×10³ | style accuracy | exact attribute accuracy "
             "| caption score |", "|---|---|---|---|---|---|---|"]
    names = {"real": "real held-out striped images", "vae_round_trip": "their VAE round trips"}

    def kid_cell(r):
        return scoring.kid_text(r) if "kid" in r else "-"
    for name, r in (ceiling or {}).items():
        lines.append(f"| *{names.get(name, name)}* | - | {r['fid']:.2f} | {kid_cell(r)} | {r['style_accuracy']:.1%} | "
                     f"{r['exact_match']:.1%} | {r['caption_score']:.1f} |")
    for name, records in results.items():
        for r in records:
            lines.append(f"| {labels.get(name, name)} | {r['steps']} | {r['fid']:.2f} | {kid_cell(r)} | "
                         f"{r['style_accuracy']:.1%} | {r['exact_match']:.1%} | {r['caption_score']:.1f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict, extra: dict, labels: dict[str, str]) -> None:
    write_results(out / "results.json", {**results, **extra})
    write_text(out / "results.md", markdown(results, labels, extra.get("ceilings")))


__all__ = ["ceilings", "evaluate_models", "markdown", "write", "striped_prompts"]
