"""The evaluation harness: FID, the caption score and exact accuracy per (sampler, steps).

``lcm evaluate`` calls ``run``: for each row it generates one image per held-out prompt (seed
``seed + i`` for image i, so a row does not depend on batch size), caches the images under
``OUT/samples/`` (a rerun with one more sampler only samples the new rows), scores them against
reference statistics of real held-out images (cached once per judge version) and writes
``results.json`` (validated against ``RESULTS_SCHEMA``), ``table1.md``, ``table1.png`` and a
sample grid per row.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..images import save_grid
from . import metrics
from .extractors import JudgeExtractor, wanted_indices
from .judge_eval import SCORED, _UNetCounter, attribute_accuracy, heldout_prompts

REFERENCE_COUNT = 2000
TABLE_SAMPLERS = ("ddim", "dpm-solver", "dpm-solver++", "lcm")
SAMPLER_LABELS = {"ddim": "DDIM", "dpm-solver": "DPM-Solver", "dpm-solver++": "DPM-Solver++", "lcm": "LCM"}

RESULTS_SCHEMA = {
    "type": "object",
    "required": ["records", "num_samples", "seed", "extractor", "reference"],
    "properties": {
        "num_samples": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer"},
        "extractor": {"type": "string"},
        "reference": {"type": "string"},
        "records": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["sampler", "steps", "fid", "clip_score", "accuracy", "unet_evals", "seconds"],
            "properties": {
                "model": {"type": "string"},
                "sampler": {"enum": list(TABLE_SAMPLERS)},
                "steps": {"type": "integer", "minimum": 1},
                "guidance": {"type": "number", "minimum": 0},
                "fid": {"type": "number", "minimum": 0},
                "clip_score": {"type": "number", "minimum": 0, "maximum": 100},
                "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                "attribute_accuracy": {"type": "object", "additionalProperties": {"type": "number"}},
                "unet_evals": {"type": "number", "minimum": 0},
                "seconds": {"type": "number", "minimum": 0},
            }}},
    },
}


def validate_results(results: dict) -> None:
    """jsonschema.ValidationError unless ``results`` has the results.json shape."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA)


def _pixels(uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LATENTCM_CACHE", Path.home() / ".cache" / "latentcm"))


def cached_stats(path: Path, pixels_fn) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) stored at ``path`` (.npz), computed once from ``pixels_fn()`` -> features when missing."""
    if path.is_file():
        with np.load(path) as f:
            return f["mu"], f["sigma"]
    mu, sigma = metrics.gaussian_stats(pixels_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    tmp.replace(path)
    return mu, sigma


def reference_stats(extractor, count: int = REFERENCE_COUNT, seed: int = 99, split: str = "heldout",
                    cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, path) of the extractor's features of ``count`` real images of ``split``, cached as
    .npz named after the extractor and its version, so a retrained judge never reuses stale statistics."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"reference-{split}-{extractor.name}-{extractor.version}-n{count}-s{seed}.npz"

    def features():
        samples = list(world.iter_samples(seed, count, split))
        return extractor.features(_pixels(world.images_array(samples)))
    return (*cached_stats(path, features), path)


@dataclass(frozen=True)
class Row:
    """One table cell group: a model sampled with one sampler, step count and guidance scale."""

    model: str  # key into the bundles dict, e.g. "lcm" or "teacher"
    sampler: str
    steps: int
    guidance: float

    @property
    def key(self) -> str:
        return f"{self.model}-{self.sampler}-{self.steps}-g{self.guidance:g}"


def _stamp(path) -> list:
    """Name, size and mtime of the safetensors in a folder (or of one file): retrained weights written
    into the same place are not mistaken for the old ones."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()]


def generate_cached(bundle, row: Row, prompts: list[str], seed: int, folder: Path,
                    batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """uint8 images [N, H, W, 3] of one row, plus {"seconds", "unet_evals"}; reused from
    ``folder`` when the same model folder, prompts and seeds made them before."""
    identity = {"model_path": str(bundle.path), "weights": _stamp(Path(bundle.path) / "unet"),
                "loras": [[p, w, _stamp(p)] for p, w in bundle.loras],
                "row": row.key, "num": len(prompts), "seed": seed, "prompts_sha": _sha(prompts)}
    path = folder / f"{row.key}-n{len(prompts)}-s{seed}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["identity"])) == identity:
                return f["images"], json.loads(str(f["timing"]))
    bundle.check_sampling(row.sampler, row.steps)
    chunks, counter, t0 = [], _UNetCounter(bundle.unet), time.perf_counter()
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=row.key, leave=False):
            batch = prompts[i:i + batch_size]
            seeds = [seed + i + j for j in range(len(batch))]
            chunks.append(_uint8(bundle.generate(batch, seeds, row.sampler, row.steps, row.guidance)))
    finally:
        counter.remove()
    timing = {"seconds": round(time.perf_counter() - t0, 2), "unet_evals": counter.count / len(prompts)}
    images = np.concatenate(chunks)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, identity=json.dumps(identity), timing=json.dumps(timing))
    tmp.replace(path)
    return images, timing


def _sha(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def score(images: np.ndarray, prompts: list[str], extractor: JudgeExtractor, reference: tuple) -> dict:
    """``score_pixels`` of uint8 images [N, H, W, 3]."""
    return score_pixels(_pixels(images), prompts, extractor, reference)


def score_pixels(x: torch.Tensor, prompts: list[str], extractor: JudgeExtractor, reference: tuple) -> dict:
    """FID to the reference (mu, sigma), the caption score, exact and per-attribute accuracy of
    images [N, 3, H, W] in [-1, 1] drawn for ``prompts``."""
    mu, sigma = metrics.gaussian_stats(extractor.features(x))
    probs = extractor.probabilities(x)
    predicted = extractor.predict_from(probs)
    wanted = [world.parse_caption(p) for p in prompts]
    return {"fid": round(metrics.frechet_distance(mu, sigma, reference[0], reference[1]), 3),
            "clip_score": round(metrics.attribute_agreement(probs, wanted_indices(prompts)), 3),
            "accuracy": round(metrics.exact_accuracy(predicted, wanted), 4),
            "attribute_accuracy": {k: round(v, 4) for k, v in attribute_accuracy(predicted, wanted).items()}}


def score_rows(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = 256,
               seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None) -> dict:
    """Generate (cached in OUT/samples), grid (OUT/grids) and score every row; the validated results dict."""
    prompts = [p for p, _ in heldout_prompts(num_samples, split=split)]
    mu, sigma, ref_path = reference_stats(extractor, cache_dir=cache_dir)
    records = []
    for row in tqdm(rows, desc="evaluate"):
        images, timing = generate_cached(bundles[row.model], row, prompts, seed, out / "samples", batch_size)
        save_grid(_pixels(images[:32]), out / "grids" / f"{row.key}.png")
        records.append({"model": row.model, "sampler": row.sampler, "steps": row.steps, "guidance": row.guidance,
                        **score(images, prompts, extractor, (mu, sigma)), **timing})
    results = {"num_samples": num_samples, "seed": seed, "split": split, "extractor": f"{extractor.name}",
               "extractor_version": extractor.version, "reference": ref_path.name,
               "models": {k: str(b.path) for k, b in bundles.items()}, "records": records}
    validate_results(results)
    return results


def run(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = 256,
        seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None) -> dict:
    """Score every row on the same held-out prompts and seeds; write results.json, table1.md,
    table1.png and grids/ into ``out``. Returns the results dict."""
    out = Path(out)
    results = score_rows(bundles, rows, extractor, out, num_samples, seed, batch_size, split, cache_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table1.md").write_text(table1_markdown(results["records"]))
    plot_against_steps(results["records"], out / "table1.png")
    return results


def table1_markdown(records: list[dict]) -> str:
    """The paper's Table 1 layout: a row per sampler, FID and score columns per step count."""
    steps = sorted({r["steps"] for r in records})
    head = ["method"] + [f"FID {n}" for n in steps] + [f"score {n}" for n in steps] + [f"exact acc. {n}" for n in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sampler in [s for s in TABLE_SAMPLERS if any(r["sampler"] == s for r in records)]:
        by_steps = {r["steps"]: r for r in records if r["sampler"] == sampler}
        cell = lambda n, key, fmt: fmt.format(by_steps[n][key]) if n in by_steps else "-"  # noqa: E731
        lines.append("| " + " | ".join([SAMPLER_LABELS[sampler]] + [cell(n, "fid", "{:.2f}") for n in steps]
                                       + [cell(n, "clip_score", "{:.1f}") for n in steps]
                                       + [cell(n, "accuracy", "{:.1%}") for n in steps]) + " |")
    return "\n".join(lines) + "\n"


def plot_against_steps(records: list[dict], path: Path, x_key: str = "steps", series_key: str = "sampler",
                       label=lambda series: SAMPLER_LABELS.get(series, str(series)), log_x: bool = True) -> Path:
    """FID and the caption score against ``x_key``, one line per ``series_key`` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for series in sorted({r[series_key] for r in records}, key=str):
        rs = sorted((r for r in records if r[series_key] == series), key=lambda r: r[x_key])
        for ax, key in zip(axes, ("fid", "clip_score")):
            ax.plot([r[x_key] for r in rs], [r[key] for r in rs], marker="o", label=label(series))
    for ax, title in zip(axes, ("FID (judge features, lower is better)", "caption score (higher is better)")):
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table_rows(samplers: list[str], steps: list[int], guidance: float | None,
               lcm_guidance: float = 8.5, teacher_guidance: float = 7.5) -> list[Row]:
    """Rows of ``lcm evaluate``: the "lcm" sampler runs on the model named "lcm", the teacher samplers
    (CFG, two UNet passes per step) on the one named "teacher"; guidance None means each one's default."""
    rows = []
    for sampler in samplers:
        model = "lcm" if sampler == "lcm" else "teacher"
        g = guidance if guidance is not None else (lcm_guidance if sampler == "lcm" else teacher_guidance)
        rows += [Row(model, sampler, n, g) for n in steps]
    return rows


__all__ = ["Row", "run", "score_rows", "score", "score_pixels", "cached_stats", "reference_stats", "generate_cached",
           "table1_markdown", "plot_against_steps", "validate_results", "RESULTS_SCHEMA", "SCORED", "table_rows"]
