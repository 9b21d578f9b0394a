"""The one evaluation path: cached generation -> ``score`` -> rows, used by every command that scores images.

* ``generate_and_score`` samples one ``Row`` (model, sampler, steps, guidance) on a list of prompts
  (``generation.generate_cached``: image i seeded ``seed + i``, cached under ``OUT/samples/``) and scores
  the images (``scoring.score``) against a reference set of real images (``references.reference_set``).
* ``score_rows`` / ``run`` lay rows out as the paper's Table 1 (``lcm evaluate``; the ``lcm`` and
  ``teacher`` presets are in ``presets``), with the real-image floor (``scoring.floor``) at the same n, and
  with ``intervals`` resamples every row's sampling intervals and paired differences to a baseline method
  (``comparisons.attach``).
* ``rescore`` recomputes those from the images ``run`` cached, without the models (``scripts/table1_report.py``).

``run`` writes ``results.json`` (validated against ``results.RESULTS_SCHEMA``), ``table1.md`` and
``table1.png`` (``reports``) and a sample grid per row.
"""
from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from ..defaults import LCM_GUIDANCE, LCM_SAMPLER, TEACHER_GUIDANCE
from ..files import write_text
from ..images import save_grid
from ..sampling.options import SamplingOptions
from . import comparisons, reports, scoring
from .extractors import JudgeExtractor
from .generation import cached_images, generate_cached
from .references import Reference, heldout_prompts, reference_set
from .results import own_schedules, read_results, validate_results, write_results

NUM_SAMPLES = 256         # images per row by default (the committed reports' n)


class Row(NamedTuple):
    """One model sampled with one sampler, step count and guidance scale g: a table row, a compare row."""

    model: str  # key into the bundles dict, e.g. "lcm" or "teacher"
    sampler: str
    steps: int
    guidance: float
    guidance_max_t: int | None = None  # teacher rows: guided only at t <= this (a guidance interval); None: every t
    schedule: str | None = None        # LCM rows: "grid" | "refine" timesteps; None: the model's own
    negative_prompt: str | None = None  # teacher rows: CFG's unconditional text; None: the empty prompt
    renoise: str | None = None         # LCM rows: "fresh" | "keep-means" re-noising; None: the model's own

    @property
    def key(self) -> str:
        interval = "" if self.guidance_max_t is None else f"-gmax{self.guidance_max_t}"
        schedule = "" if self.schedule is None else f"-{self.schedule}"
        negative = "" if self.negative_prompt is None else f"-neg{sha256(self.negative_prompt.encode()).hexdigest()[:8]}"
        renoise = "" if self.renoise is None else f"-{self.renoise}"
        return f"{self.model}-{self.sampler}-{self.steps}-g{self.guidance:g}{interval}{schedule}{negative}{renoise}"

    @property
    def options(self) -> SamplingOptions:
        """The row's sampling options (checked once, by ``SamplingOptions``)."""
        return SamplingOptions(self.sampler, self.steps, self.guidance, guidance_max_t=self.guidance_max_t,
                               schedule=self.schedule, negative_prompt=self.negative_prompt, renoise=self.renoise)

    @property
    def label(self) -> str:
        if self.sampler == LCM_SAMPLER:
            return f"LCM {self.steps} step{'s' if self.steps > 1 else ''}"
        return f"teacher {self.sampler.upper()}\n{self.steps} steps, CFG {self.guidance:g}"


def generate_and_score(bundle, row: Row, prompts: list[str], extractor: JudgeExtractor, reference: Reference,
                       folder: Path, *, seed: int = 0, batch_size: int = 32, image_format: str = "uint8",
                       tag: str = "", bootstrap: int = 0, per_image: bool = False) -> tuple[dict, np.ndarray, dict]:
    """``generate_cached`` then ``score``: (scores, images, {"seconds", "unet_evals"}) of one row."""
    images, timing = generate_cached(bundle, row, prompts, seed, Path(folder), batch_size, image_format, tag)
    return scoring.score(images, prompts, extractor, reference, bootstrap=bootstrap, per_image=per_image), images, timing


def score_rows(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = NUM_SAMPLES,
               seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None,
               reference: str = "prompt-scenes", bootstrap: int = 0, ceiling: Row | list[Row] | None = None,
               sweep: list[Row] = (), intervals: int = 0, baseline: str | None = None) -> dict:
    """Generate (cached in OUT/samples), grid (OUT/grids) and score every row, plus the real-image
    floor at the same n; the validated results dict. ``ceiling``: the teacher's guided ODE solved finely
    from t = T - 1, what an LCM distils towards (results["ceiling"]; a list: the first there, the others,
    e.g. the ODE under a guidance interval, in results["ceilings"]); ``sweep`` (results["sweep"]): the same
    methods at other guidance scales, scored alike, for each method's best guidance. ``intervals`` > 0: that
    many resamples of every row's sampling intervals and paired differences to the rows of the ``baseline``
    sampler (``comparisons.attach``)."""
    out = Path(out)
    prompts = [p for p, _ in heldout_prompts(num_samples, split=split)]
    ref = reference_set(extractor, reference, cache_dir=cache_dir)
    tops = [ceiling] if isinstance(ceiling, Row) else list(ceiling or [])
    extra = [("ceiling", r) for r in tops] + [("sweep", r) for r in sweep]
    found, values = {"records": [], "ceiling": [], "sweep": []}, {}
    for part, row in tqdm([("records", r) for r in rows] + extra, desc="evaluate"):
        scores, images, timing = generate_and_score(bundles[row.model], row, prompts, extractor, ref,
                                                    out / "samples", seed=seed, batch_size=batch_size,
                                                    bootstrap=bootstrap, per_image=intervals > 0)
        values[row.key] = scores.pop("per_image", None)
        save_grid(scoring.model_images(images[:32]), out / "grids" / f"{row.key}.png")
        found[part].append({**row_record(row), **scoring.rounded(scores), **timing})
    tops_found = found["ceiling"]
    results = {"num_samples": num_samples, "seed": seed, "split": split, "extractor": f"{extractor.name}",
               "extractor_version": extractor.version, "reference": ref.name, "reference_kind": ref.kind,
               "image_format": "uint8", "models": {k: str(b.path) for k, b in bundles.items()},
               "timestep_schedules": own_schedules(bundles),
               "records": found["records"], "floor": scoring.floor(extractor, ref, num_samples, split, bootstrap),
               **({"ceiling": tops_found[0]} if tops_found else {}),
               **({"ceilings": tops_found[1:]} if len(tops_found) > 1 else {}),
               **({"sweep": found["sweep"]} if sweep else {})}
    if intervals:
        comparisons.attach(results, values, ref.features, baseline=baseline, num_resamples=intervals)
    validate_results(results)
    return results


def row_record(row: Row) -> dict:
    """A results record's fields that name its row (``record_row`` reads them back)."""
    options = {k: v for k, v in (("guidance_max_t", row.guidance_max_t), ("schedule", row.schedule)) if v is not None}
    return {"key": row.key, "model": row.model, "sampler": row.sampler, "steps": row.steps,
            "guidance": row.guidance, **options}


def record_row(record: dict) -> Row:
    """The ``Row`` a results record was scored from (older files name no "key")."""
    return Row(record.get("model", LCM_SAMPLER if record["sampler"] == LCM_SAMPLER else "teacher"),
               record["sampler"], record["steps"], record["guidance"], record.get("guidance_max_t"),
               record.get("schedule"))


def write_table1(results: dict, out: Path, with_json: bool = True) -> None:
    """results.json (``with_json``), table1.md and table1.png of a Table 1 results dict into ``out``."""
    out = Path(out)
    if with_json:
        write_results(out / "results.json", results)
    write_text(out / "table1.md", reports.results_markdown(results))
    reports.plot_against_steps([{**r, "method": reports.method_label(r)} for r in results["records"]],
                               out / "table1.png", series_key="method", label=str, hlines=reports.hlines(results))


def run(bundles: dict, rows: list[Row], extractor: JudgeExtractor, out: Path, num_samples: int = NUM_SAMPLES,
        seed: int = 0, batch_size: int = 32, split: str = "heldout", cache_dir: Path | None = None,
        reference: str = "prompt-scenes", bootstrap: int = 0, ceiling: Row | list[Row] | None = None,
        sweep: list[Row] = (), intervals: int = 0, baseline: str | None = None) -> dict:
    """Score every row on the same held-out prompts and seeds; write results.json, table1.md,
    table1.png and grids/ into ``out``. Returns the results dict. ``ceiling``, ``sweep``, ``intervals`` and
    ``baseline``: see ``score_rows``; with a sweep, table1.md also has the table of each method at its best guidance."""
    results = score_rows(bundles, rows, extractor, out, num_samples, seed, batch_size, split, cache_dir,
                         reference, bootstrap, ceiling, sweep, intervals, baseline)
    write_table1(results, out)
    return results


def rescore(folder: Path, extractor: JudgeExtractor, *, intervals: int, baseline: str | None = LCM_SAMPLER,
            cache_dir: Path | None = None) -> dict:
    """The sampling intervals and paired differences of a Table 1 folder (``run``'s output) from its results.json
    and the images cached in FOLDER/samples, no model loaded; rewrites results.json, table1.md and table1.png.
    ValueError when the judge or reference differ from the file's or a row's images are not cached."""
    folder = Path(folder)
    results = read_results(folder / "results.json")
    if results.get("extractor_version") != extractor.version:
        raise ValueError(f"{folder / 'results.json'} was scored by judge version {results.get('extractor_version')}, "
                         f"not {extractor.version}")
    ref = reference_set(extractor, results["reference_kind"], cache_dir=cache_dir)
    if ref.name != results["reference"]:
        raise ValueError(f"the results' reference {results['reference']} is not this judge's {ref.name}")
    prompts = [p for p, _ in heldout_prompts(results["num_samples"], split=results.get("split", "heldout"))]
    rows = results["records"] + results.get("sweep", []) + reports.ceilings(results)
    values, missing = {}, []
    for r in rows:
        r["key"] = r.get("key") or record_row(r).key
        images = cached_images(folder / "samples", r["key"], prompts, results["seed"])
        if images is None:
            missing.append(r["key"])
        elif r["key"] not in values:
            values[r["key"]] = scoring.score(images, prompts, extractor, ref, per_image=True)["per_image"]
    if missing:
        raise ValueError(f"no cached images in {folder / 'samples'} for {len(missing)} rows ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): rerun the lcm evaluate command that made the table")
    comparisons.attach(results, values, ref.features, baseline=baseline, num_resamples=intervals)
    validate_results(results)
    write_table1(results, folder)
    return results


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


__all__ = ["Row", "run", "rescore", "score_rows", "row_record", "record_row", "write_table1", "generate_and_score", "table_rows", "NUM_SAMPLES"]
