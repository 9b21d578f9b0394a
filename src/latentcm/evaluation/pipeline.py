"""The one evaluation path: cached generation -> ``score`` -> rows, used by every command that scores images.

* ``generate_cached`` samples one ``Row`` (model, sampler, steps, guidance) on a list of prompts (image i
  seeded ``seed + i``, so a row does not depend on batch size), counts UNet evaluations and caches the
  images under ``OUT/samples/`` (a rerun with one more sampler only samples the new rows).
* ``score`` is the one scoring function: FID, KID, precision / recall, the caption score, exact and
  per-attribute accuracy and per-attribute histogram distances of images against a ``Reference`` of
  real images (features and labels, cached once per judge version).
* ``generate_and_score`` is the two together; ``score_rows`` / ``run`` lay rows out as the paper's
  Table 1 (``lcm evaluate``; the ``lcm`` and ``teacher`` presets are in ``presets``), ``floor`` scores
  real images of the same prompts (what a perfect generator scores at that n).

``run`` writes ``results.json`` (validated against ``RESULTS_SCHEMA``), ``table1.md``, ``table1.png``
and a sample grid per row.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..defaults import LCM_GUIDANCE, LCM_SAMPLER, TEACHER_GUIDANCE, TEACHER_SAMPLERS, TEACHER_SOLVERS
from ..defaults import TIMESTEP_SCHEDULES, TRAILING
from ..images import save_grid, vae_round_trip
from . import metrics
from .extractors import JudgeExtractor, wanted_indices

PROMPT_SEED = 99          # world seed of the held-out prompts (prompt i: sample i of this seed)
REFERENCE_COUNT = 2000    # real images in a reference set
NUM_SAMPLES = 256         # images per row by default (the committed reports' n)
QUICK_SAMPLES = 256       # ``--quick``
# The independent reference starts at this sample index of PROMPT_SEED: no prompt index (< 100000,
# the CLI's limit) reaches it, so its scenes are disjoint from every prompt's.
INDEPENDENT_START = 1_000_000
REFERENCE_KINDS = ("prompt-scenes", "independent")

SCORED = ("colour", "background", "shape", "size", "position")
HISTOGRAM_ATTRIBUTES = ("size", "position")  # the judge's labels of samples vs the reference's, per attribute
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_K = 3                  # k of improved precision / recall
KID_SCALE = 1000.0        # KID is reported x 10^3
ROUNDING = {"fid": 3, "kid": 4, "kid_std": 4, "precision": 4, "recall": 4, "clip_score": 3, "accuracy": 4,
            "attribute_accuracy": 4, "histogram_distance": 4, "fid_ci": 3}

TABLE_SAMPLERS = (*TEACHER_SAMPLERS, LCM_SAMPLER)
SAMPLER_LABELS = {"ddim": "DDIM", "dpm-solver": "DPM-Solver", "dpm-solver++": "DPM-Solver++", "lcm": "LCM"}
SAMPLER_LABELS.update({s + TRAILING: SAMPLER_LABELS[s] + " trailing" for s in TEACHER_SOLVERS})

_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_UNIT_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
SCORE_PROPERTIES = {
    "fid": {"type": "number", "minimum": 0},
    "kid": {"type": "number", "description": "KID x 10^3: mean over subsets (can be negative)"},
    "kid_std": {"type": "number", "minimum": 0, "description": "KID x 10^3: std over subsets"},
    "precision": _UNIT_OR_NULL,   # null when a set has at most PR_K images
    "recall": _UNIT_OR_NULL,
    "clip_score": {"type": "number", "minimum": 0, "maximum": 100},
    "accuracy": _UNIT,            # exact: every attribute the caption names judged right
    "attribute_accuracy": {"type": "object", "additionalProperties": {"type": "number"}},
    "histogram_distance": {"type": "object", "required": list(HISTOGRAM_ATTRIBUTES),
                           "additionalProperties": _UNIT},
    "fid_ci": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}
SCORE_REQUIRED = ["fid", "kid", "kid_std", "precision", "recall", "clip_score", "accuracy",
                  "attribute_accuracy", "histogram_distance"]
FLOOR_SCHEMA = {"type": "object", "required": [*SCORE_REQUIRED, "num_samples"],
                "properties": {**SCORE_PROPERTIES, "num_samples": {"type": "integer", "minimum": 1}}}

# LCM name -> the timestep schedule its rows use when they name none (the model folder's sampling.json)
TIMESTEP_SCHEDULES_SCHEMA = {"type": "object", "additionalProperties": {"enum": list(TIMESTEP_SCHEDULES)}}

RECORD_SCHEMA = {
    "type": "object",
    "required": ["sampler", "steps", *SCORE_REQUIRED, "unet_evals", "seconds"],
    "properties": {
        "model": {"type": "string"},
        "sampler": {"enum": list(TABLE_SAMPLERS)},
        "steps": {"type": "integer", "minimum": 1},
        "guidance": {"type": "number", "minimum": 0},
        "guidance_max_t": {"type": "integer", "minimum": 0},  # present on rows guided only at t <= it
        "schedule": {"enum": list(TIMESTEP_SCHEDULES)},  # the LCM rows' timesteps, when the row names them
        **SCORE_PROPERTIES,
        "unet_evals": {"type": "number", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
    }}

RESULTS_SCHEMA = {
    "type": "object",
    "required": ["records", "num_samples", "seed", "extractor", "reference", "reference_kind", "floor"],
    "properties": {
        "num_samples": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer"},
        "extractor": {"type": "string"},
        "reference": {"type": "string"},
        "reference_kind": {"enum": list(REFERENCE_KINDS)},
        "floor": FLOOR_SCHEMA,
        "records": {"type": "array", "minItems": 1, "items": RECORD_SCHEMA},
        "ceiling": RECORD_SCHEMA,  # optional: the teacher's guided ODE, many steps from t = T - 1
        "ceilings": {"type": "array", "items": RECORD_SCHEMA},  # optional: more ODE rows (a guidance interval)
        "sweep": {"type": "array", "items": RECORD_SCHEMA},  # optional: the rows at the other guidance scales
        "timestep_schedules": TIMESTEP_SCHEDULES_SCHEMA,
    },
}


def own_schedules(bundles: dict) -> dict[str, str]:
    """The timestep schedule each LCM in ``bundles`` samples with when a row names none (its sampling.json)."""
    return {name: b.timestep_schedule for name, b in bundles.items() if getattr(b, "is_lcm", False)}


def validate_results(results: dict, schema: dict | None = None) -> None:
    """jsonschema.ValidationError unless ``results`` has the results.json shape (``schema``: RESULTS_SCHEMA)."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA if schema is None else schema)


# --- rows, prompts, pixels -----------------------------------------------------------------------------

class Row(NamedTuple):
    """One model sampled with one sampler, step count and guidance scale g: a table row, a compare row."""

    model: str  # key into the bundles dict, e.g. "lcm" or "teacher"
    sampler: str
    steps: int
    guidance: float
    guidance_max_t: int | None = None  # teacher rows: guided only at t <= this (a guidance interval); None: every t
    schedule: str | None = None        # LCM rows: "grid" | "refine" timesteps; None: the model's own

    @property
    def key(self) -> str:
        interval = "" if self.guidance_max_t is None else f"-gmax{self.guidance_max_t}"
        schedule = "" if self.schedule is None else f"-{self.schedule}"
        return f"{self.model}-{self.sampler}-{self.steps}-g{self.guidance:g}{interval}{schedule}"

    @property
    def label(self) -> str:
        if self.sampler == LCM_SAMPLER:
            return f"LCM {self.steps} step{'s' if self.steps > 1 else ''}"
        return f"teacher {self.sampler.upper()}\n{self.steps} steps, CFG {self.guidance:g}"


def heldout_samples(count: int, seed: int = PROMPT_SEED, split: str = "heldout") -> list[world.Sample]:
    """The real world samples the evaluation prompts are the captions of."""
    return list(world.iter_samples(seed, count, split))


def heldout_prompts(count: int, seed: int = PROMPT_SEED, split: str = "heldout") -> list[tuple[str, dict[str, str]]]:
    """Held-out captions (held-out templates and attribute triples) with what they ask for."""
    return [(s.text, world.parse_caption(s.text)) for s in heldout_samples(count, seed, split)]


def attribute_accuracy(predicted: list[dict[str, str]], wanted: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute: the share of images whose judged value equals the one the prompt named
    (only images whose prompt names that attribute count)."""
    out = {}
    for key in SCORED:
        hits = [p[key] == w[key] for p, w in zip(predicted, wanted) if key in w]
        if hits:
            out[key] = float(np.mean(hits))
    return out


def _pixels(uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pixels(images) -> torch.Tensor:
    """Images as float [N, 3, H, W] in [-1, 1]: from uint8 [N, H, W, 3] (8-bit images), float32
    [N, 3, H, W] arrays (the decoder's output, cached) or tensors."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if images.dtype == np.uint8:
        return _pixels(images)
    return torch.from_numpy(np.ascontiguousarray(images)).float()


class UNetCounter:
    """Counts the images a module's forward sees (UNet evaluations), via a forward pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.count += (args[0] if args else kwargs["sample"]).shape[0]

    def remove(self) -> None:
        self._handle.remove()


# --- reference sets ------------------------------------------------------------------------------------

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=features,
             **{f"label_{k}": np.asarray(v, dtype=str) for k, v in labels.items()})
    tmp.replace(path)
    return Reference(features, mu, sigma, {k: np.asarray(v, dtype=str) for k, v in labels.items()}, path, kind)


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
        features = extractor.features(_pixels(world.images_array(samples)))
        return features, {k: [s.scene.attributes()[k] for s in samples] for k in HISTOGRAM_ATTRIBUTES}
    return cached_reference(path, make, kind)


# --- generation ----------------------------------------------------------------------------------------

def _stamp(path) -> list:
    """Name, size and mtime of the safetensors in a folder (or of one file): retrained weights written
    into the same place are not mistaken for the old ones."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()]


def _sha(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


IMAGE_FORMATS = ("uint8", "float32")


def generate_cached(bundle, row: Row, prompts: list[str], seed: int, folder: Path, batch_size: int = 32,
                    image_format: str = "uint8", tag: str = "") -> tuple[np.ndarray, dict]:
    """Images of one row, plus {"seconds", "unet_evals"} (UNet evaluations per image, counted); reused
    from ``folder`` when the same model folder, prompts and seeds made them before.

    image_format "uint8": 8-bit images [N, H, W, 3] (what a user saves); "float32": the decoder's output
    [N, 3, H, W] in [-1, 1]. ``tag`` names a prompt set in the file name (e.g. "paraphrase").
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    identity = {"model_path": str(bundle.path), "weights": _stamp(Path(bundle.path) / "unet"),
                "loras": [[p, w, _stamp(p)] for p, w in bundle.loras],
                "row": row.key, "num": len(prompts), "seed": seed, "prompts_sha": _sha(prompts)}
    if image_format != "uint8":
        identity["format"] = image_format
    if row.sampler == LCM_SAMPLER:  # the timesteps: the row's schedule, else the one the model folder asks for
        identity["schedule"] = row.schedule or getattr(bundle, "timestep_schedule", "grid")
    suffix = "".join(f"-{t}" for t in (tag, "f32" if image_format == "float32" else "") if t)
    path = folder / f"{row.key}-n{len(prompts)}-s{seed}{suffix}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["identity"])) == identity:
                return f["images"], json.loads(str(f["timing"]))
    bundle.check_sampling(row.sampler, row.steps)
    convert = _uint8 if image_format == "uint8" else (lambda x: x.float().cpu().numpy())
    chunks, counter, t0 = [], UNetCounter(bundle.unet), time.perf_counter()
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=row.key, leave=False):
            batch = prompts[i:i + batch_size]
            seeds = [seed + i + j for j in range(len(batch))]
            chunks.append(convert(bundle.generate(batch, seeds, row.sampler, row.steps, row.guidance,
                                                  guidance_max_t=row.guidance_max_t, schedule=row.schedule)))
    finally:
        counter.remove()
    timing = {"seconds": round(time.perf_counter() - t0, 2), "unet_evals": counter.count / len(prompts)}
    images = np.concatenate(chunks)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, identity=json.dumps(identity), timing=json.dumps(timing))
    tmp.replace(path)
    return images, timing


# --- scoring -------------------------------------------------------------------------------------------

def score(images, prompts: list[str], extractor: JudgeExtractor, reference: Reference, *,
          wanted: list[dict[str, str]] | None = None, bootstrap: int = 0) -> dict:
    """The one scoring function: every command that scores images calls it.

    Args:
        images: uint8 [N, H, W, 3], or float [N, 3, H, W] in [-1, 1] (array or tensor), drawn for ``prompts``.
        reference: real images (``reference_set``), for FID, KID, precision / recall and histograms.
        wanted: per image, attribute -> the value it should have (default: what its prompt names).
        bootstrap: resamples of a percentile bootstrap interval of FID (0: none).

    Returns (unrounded; ``rounded`` rounds for tables):
        fid, kid and kid_std (x 10^3: mean and std over KID_SUBSETS subsets of min(KID_SUBSET_SIZE, N, M)
        rows, on features divided by the reference features' RMS), precision and recall (k = PR_K, against an equal-size random subset of the reference;
        None when N <= PR_K), clip_score (the caption score), accuracy (exact), attribute_accuracy,
        histogram_distance (attribute -> total variation between the judge's labels of the images and
        the reference's labels, for HISTOGRAM_ATTRIBUTES), and fid_ci [lower, upper] with ``bootstrap``.
    """
    x = to_pixels(images)
    features = extractor.features(x)
    probs = extractor.probabilities(x)
    predicted = extractor.predict_from(probs)
    if wanted is None:
        wanted = [world.parse_caption(p) for p in prompts]
    mu, sigma = metrics.gaussian_stats(features)
    # the cubic kernel depends on the feature scale: scale both sets by the reference's RMS per dimension
    # (one fixed linear map, so rows stay comparable; Inception-like magnitudes)
    scale = float(np.sqrt(np.mean(reference.features.astype(np.float64) ** 2))) or 1.0
    kid_mean, kid_std = metrics.kid(features.astype(np.float64) / scale, reference.features.astype(np.float64) / scale,
                                    KID_SUBSETS, KID_SUBSET_SIZE)  # float64: no last-digit jitter between runs
    n = min(len(features), len(reference.features))
    if n > PR_K:
        pick = np.sort(np.random.default_rng(0).choice(len(reference.features), n, replace=False))
        precision, recall = metrics.precision_recall(reference.features[pick], features, PR_K)
    else:
        precision = recall = None
    out = {"fid": metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma),
           "kid": KID_SCALE * kid_mean, "kid_std": KID_SCALE * kid_std,
           "precision": precision, "recall": recall,
           "clip_score": metrics.attribute_agreement(probs, wanted_indices(prompts)),
           "accuracy": metrics.exact_accuracy(predicted, wanted),
           "attribute_accuracy": attribute_accuracy(predicted, wanted),
           "histogram_distance": {k: metrics.histogram_distance([p[k] for p in predicted], list(reference.labels[k]),
                                                                world.ATTRIBUTES[k])
                                  for k in HISTOGRAM_ATTRIBUTES}}
    if bootstrap:
        _, lower, upper = metrics.bootstrap_ci(features, reference.features, metrics.fid, num_resamples=bootstrap)
        out["fid_ci"] = [lower, upper]
    return out


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


def generate_and_score(bundle, row: Row, prompts: list[str], extractor: JudgeExtractor, reference: Reference,
                       folder: Path, *, seed: int = 0, batch_size: int = 32, image_format: str = "uint8",
                       tag: str = "", bootstrap: int = 0) -> tuple[dict, np.ndarray, dict]:
    """``generate_cached`` then ``score``: (scores, images, {"seconds", "unet_evals"}) of one row."""
    images, timing = generate_cached(bundle, row, prompts, seed, Path(folder), batch_size, image_format, tag)
    return score(images, prompts, extractor, reference, bootstrap=bootstrap), images, timing


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


@torch.no_grad()
def vae_psnr(vae, count: int = 512, seed: int = PROMPT_SEED, batch_size: int = 128) -> float:
    """Mean reconstruction PSNR (dB, 8-bit images) on held-out world images."""
    x = _pixels(world.images_array(heldout_samples(count, seed)))
    rec8 = ((vae_round_trip(vae, x, batch_size) + 1) * 127.5).round()
    mse = (rec8 - (x + 1) * 127.5).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


# --- Table 1 -------------------------------------------------------------------------------------------

def score_rows(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = NUM_SAMPLES,
               seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None,
               reference: str = "prompt-scenes", bootstrap: int = 0, ceiling: Row | list[Row] | None = None,
               sweep: list[Row] = ()) -> dict:
    """Generate (cached in OUT/samples), grid (OUT/grids) and score every row, plus the real-image
    floor at the same n; the validated results dict. ``ceiling``: the teacher's guided ODE solved finely
    from t = T - 1, what an LCM distils towards (results["ceiling"]; a list: the first there, the others,
    e.g. the ODE under a guidance interval, in results["ceilings"]); ``sweep`` (results["sweep"]): the same
    methods at other guidance scales, scored alike, for each method's best guidance."""
    out = Path(out)
    prompts = [p for p, _ in heldout_prompts(num_samples, split=split)]
    ref = reference_set(extractor, reference, cache_dir=cache_dir)
    tops = [ceiling] if isinstance(ceiling, Row) else list(ceiling or [])
    extra = [("ceiling", r) for r in tops] + [("sweep", r) for r in sweep]
    records, found = [], {"ceiling": [], "sweep": []}
    for part, row in tqdm([("records", r) for r in rows] + extra, desc="evaluate"):
        scores, images, timing = generate_and_score(bundles[row.model], row, prompts, extractor, ref,
                                                    out / "samples", seed=seed, batch_size=batch_size,
                                                    bootstrap=bootstrap)
        save_grid(to_pixels(images[:32]), out / "grids" / f"{row.key}.png")
        options = {k: v for k, v in (("guidance_max_t", row.guidance_max_t), ("schedule", row.schedule))
                   if v is not None}
        (records if part == "records" else found[part]).append(
            {"model": row.model, "sampler": row.sampler, "steps": row.steps, "guidance": row.guidance, **options,
             **rounded(scores), **timing})
    tops_found = found["ceiling"]
    results = {"num_samples": num_samples, "seed": seed, "split": split, "extractor": f"{extractor.name}",
               "extractor_version": extractor.version, "reference": ref.name, "reference_kind": ref.kind,
               "image_format": "uint8", "models": {k: str(b.path) for k, b in bundles.items()},
               "timestep_schedules": own_schedules(bundles),
               "records": records, "floor": floor(extractor, ref, num_samples, split, bootstrap),
               **({"ceiling": tops_found[0]} if tops_found else {}),
               **({"ceilings": tops_found[1:]} if len(tops_found) > 1 else {}),
               **({"sweep": found["sweep"]} if sweep else {})}
    validate_results(results)
    return results


def run(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = NUM_SAMPLES,
        seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None,
        reference: str = "prompt-scenes", bootstrap: int = 0, ceiling: Row | list[Row] | None = None,
        sweep: list[Row] = ()) -> dict:
    """Score every row on the same held-out prompts and seeds; write results.json, table1.md,
    table1.png and grids/ into ``out``. Returns the results dict. ``ceiling`` and ``sweep``: see ``score_rows``;
    with a sweep, table1.md also has the table of each method at its best guidance."""
    out = Path(out)
    results = score_rows(bundles, rows, extractor, out, num_samples, seed, batch_size, split, cache_dir,
                         reference, bootstrap, ceiling, sweep)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table1.md").write_text(results_markdown(results))
    plot_against_steps([{**r, "method": _method(r)} for r in results["records"]], out / "table1.png",
                       series_key="method", label=str, hlines=_hlines(results))
    return results


def ceilings(results: dict) -> list[dict]:
    """The ceiling records of a results dict: results["ceiling"], then results["ceilings"] (either may be absent)."""
    return ([results["ceiling"]] if "ceiling" in results else []) + list(results.get("ceilings", []))


def _hlines(results: dict) -> dict:
    lines = {"real images (floor)": results["floor"]}
    for top in ceilings(results):
        lines[f"ceiling: {_method(top, True)}"] = top
    return lines


def _method(r: dict, with_steps: bool = False) -> str:
    """A record's method and guidance: "LCM, w 7.5" (the paper's w = g - 1), "DDIM trailing, 50 steps, g 8.5",
    ", guided t <= T" for a guidance interval and ", refine timesteps" for an LCM row's named schedule."""
    name = SAMPLER_LABELS[r["sampler"]] + (f", {r['steps']} steps" if with_steps else "")
    name = f"{name}, w {r['guidance'] - 1:g}" if r["sampler"] == LCM_SAMPLER else f"{name}, g {r['guidance']:g}"
    return ", ".join([name, *_variant_words(_variant(r))])


def _variant(r: dict) -> tuple:
    """What tells a record's method apart beside its sampler: guidance interval and timestep schedule."""
    return r.get("guidance_max_t"), r.get("schedule")


def _variant_words(variant: tuple) -> list[str]:
    """A variant as label words: "guided t ≤ T" for a guidance interval, "refine timesteps" for a schedule."""
    interval, schedule = variant
    return ([] if interval is None else [f"guided t ≤ {interval}"]) + ([] if schedule is None else
                                                                       [f"{schedule} timesteps"])


def _methods(records: list[dict]) -> list[tuple[str, tuple]]:
    """The (sampler, variant) pairs of ``records`` in table order: samplers as TABLE_SAMPLERS, full guidance
    before an interval, the model's own schedule before a named one."""
    found = {(r["sampler"], _variant(r)) for r in records}
    return sorted(found, key=lambda m: (TABLE_SAMPLERS.index(m[0]), -1 if m[1][0] is None else m[1][0],
                                        m[1][1] or ""))


def results_markdown(results: dict) -> str:
    """table1.md: Table 1 at the rows' guidance, the ceiling and floor rows, the best-guidance table of a sweep."""
    text = table1_markdown(results["records"], results.get("floor"), ceilings(results))
    if results.get("sweep"):
        text += "\n" + best_guidance_markdown(results["records"] + results["sweep"])
    return text


def _kid_cell(r: dict) -> str:
    return f"{r['kid']:.2f} ± {r['kid_std']:.2f}"


def table1_markdown(records: list[dict], floor_scores: dict | None = None,
                    ceiling: dict | list[dict] | None = None) -> str:
    """The paper's Table 1 layout: a row per sampler (with its guidance: g, and the LCM's w = g - 1), FID,
    KID (x 10^3, mean ± std over subsets), score and exact accuracy columns per step count; then the
    teacher's guided-ODE ceiling and the real-image floor (each the same value in every column)."""
    steps = sorted({r["steps"] for r in records})
    head = (["method"] + [f"FID {n}" for n in steps] + [f"KID×10³ {n}" for n in steps]
            + [f"score {n}" for n in steps] + [f"exact acc. {n}" for n in steps])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label, by_steps):
        def cell(n, fmt):
            return fmt(by_steps[n]) if n in by_steps else "-"
        return ("| " + " | ".join([label] + [cell(n, lambda r: f"{r['fid']:.2f}") for n in steps]
                                  + [cell(n, _kid_cell) for n in steps]
                                  + [cell(n, lambda r: f"{r['clip_score']:.1f}") for n in steps]
                                  + [cell(n, lambda r: f"{r['accuracy']:.1%}") for n in steps]) + " |")
    for sampler, variant in _methods(records):
        mine = [r for r in records if r["sampler"] == sampler and _variant(r) == variant]
        label = _method(mine[0]) if "guidance" in mine[0] else SAMPLER_LABELS[sampler]
        lines.append(line(label, {r["steps"]: r for r in mine}))
    for top in [ceiling] if isinstance(ceiling, dict) else (ceiling or []):
        lines.append(line(f"*ceiling: {_method(top, True)}*", {n: top for n in steps}))
    if floor_scores:
        label = f"*real images (floor, n = {floor_scores['num_samples']})*"
        lines.append(line(label, {n: floor_scores for n in steps}))
    return "\n".join(lines) + "\n"


def best_guidance_markdown(records: list[dict]) -> str:
    """Each method at each step count at its best guidance (lowest KID) among the swept ones: KID, FID, g."""
    steps = sorted({r["steps"] for r in records})
    lines = ["Each method at its best guidance (lowest KID×10³ of the sweep; g in brackets, the LCM's w = g − 1):", "",
             "| method | " + " | ".join(f"KID×10³ {n} (g)" for n in steps) + " | "
             + " | ".join(f"FID {n}" for n in steps) + " |", "|" + "---|" * (1 + 2 * len(steps))]
    for sampler, variant in _methods(records):
        mine = [r for r in records if r["sampler"] == sampler and _variant(r) == variant]
        best = {}
        for r in mine:
            if r["steps"] not in best or r["kid"] < best[r["steps"]]["kid"]:
                best[r["steps"]] = r
        swept = sorted({r["guidance"] for r in mine})
        kid = [f"{_kid_cell(best[n])} ({best[n]['guidance']:g})" if n in best else "-" for n in steps]
        fid = [f"{best[n]['fid']:.2f}" if n in best else "-" for n in steps]
        guidances = "g " + ", ".join(f"{g:g}" for g in swept)
        label = f"{SAMPLER_LABELS[sampler]} ({'; '.join([guidances, *_variant_words(variant)])})"
        lines.append("| " + " | ".join([label, *kid, *fid]) + " |")
    return "\n".join(lines) + "\n"


def plot_against_steps(records: list[dict], path: Path, x_key: str = "steps", series_key: str = "sampler",
                       label=lambda series: SAMPLER_LABELS.get(series, str(series)), log_x: bool = True,
                       hlines: dict | None = None) -> Path:
    """FID and the caption score against ``x_key``, one line per ``series_key`` value; ``hlines``
    {label: scores} draws reference levels (the ceiling, the floor) as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for series in sorted({r[series_key] for r in records}, key=str):
        rs = sorted((r for r in records if r[series_key] == series), key=lambda r: r[x_key])
        for ax, key in zip(axes, ("fid", "clip_score")):
            ax.plot([r[x_key] for r in rs], [r[key] for r in rs], marker="o", label=label(series))
    for (name, scores), style in zip((hlines or {}).items(), ("--", ":", "-.")):
        for ax, key in zip(axes, ("fid", "clip_score")):
            ax.axhline(scores[key], color="grey", linestyle=style, linewidth=1, label=name)
    axes[0].set_yscale("log")  # a 1-step solver's FID can be 60x the floor
    for ax, title in zip(axes, ("FID (judge features, log scale, lower is better)", "caption score (higher is better)")):
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
               lcm_guidance: float = LCM_GUIDANCE, teacher_guidance: float = TEACHER_GUIDANCE,
               lcm_steps: list[int] | None = None, guidance_max_t: int | None = None,
               lcm_schedules: list[str] | None = None) -> list[Row]:
    """Rows of ``lcm evaluate``: the "lcm" sampler runs on the model named "lcm" (at ``lcm_steps``, default
    ``steps``), the teacher samplers (CFG, two UNet passes per step) on the one named "teacher"; guidance
    None means each one's default. ``guidance_max_t``: every teacher row also under that guidance interval;
    ``lcm_schedules``: the LCM rows once per named timestep schedule (None: once, with the model's own)."""
    rows = []
    for sampler in samplers:
        model = "lcm" if sampler == LCM_SAMPLER else "teacher"
        g = guidance if guidance is not None else (lcm_guidance if sampler == LCM_SAMPLER else teacher_guidance)
        counts = lcm_steps if sampler == LCM_SAMPLER and lcm_steps else steps
        schedules = (lcm_schedules or [None]) if sampler == LCM_SAMPLER else [None]
        rows += [Row(model, sampler, n, g, schedule=sch) for sch in schedules for n in counts]
    if guidance_max_t is not None:
        rows += [r._replace(guidance_max_t=guidance_max_t) for r in rows if r.sampler != LCM_SAMPLER]
    return rows


__all__ = ["Row", "Reference", "run", "score_rows", "score", "generate_and_score", "generate_cached", "floor",
           "rounded", "reference_set", "cached_reference", "heldout_prompts", "heldout_samples",
           "attribute_accuracy", "judge_on_real", "ceilings", "vae_psnr", "UNetCounter", "table1_markdown",
           "plot_against_steps", "results_markdown", "best_guidance_markdown", "validate_results", "RESULTS_SCHEMA", "SCORED", "table_rows", "to_pixels"]
