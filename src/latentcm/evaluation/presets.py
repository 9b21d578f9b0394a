"""The ``lcm`` and ``teacher`` presets of ``lcm evaluate`` (``table1`` is ``pipeline.run``): layouts of
``pipeline.generate_and_score`` rows, nothing that samples or scores on its own.

* ``lcm_table``: judge accuracy per attribute (``attribute_accuracy``), UNet evaluations and seconds of
  ``LCM_TABLE_ROWS`` (formerly ``lcm evaluate-lcm``; ``reports/lcm/``).
* ``teacher``: a teacher on held-out prompts and on paraphrases with unseen words, its VAE's
  reconstruction PSNR and the judge's ceiling on real images (formerly ``lcm evaluate-teacher``;
  ``reports/teacher/``).

Both judge the decoder's float output (``image_format="float32"``), as the committed reports were
measured; Table 1 scores 8-bit images. The two differ for an image or two in 256 (a judged position
or shape near a decision boundary), so each preset keeps the format its committed numbers came from.
Every row also carries FID, KID, precision / recall and histogram distances, and results.json the
real-image floor at the same n.
"""
from __future__ import annotations

from pathlib import Path

from ..defaults import LCM_GUIDANCE, LCM_SAMPLER, TEACHER_GUIDANCE, TEACHER_SAMPLER, TEACHER_STEPS
from ..files import write_text
from ..images import save_grid
from . import comparisons, pipeline, references, results as results_file, scoring
from .pipeline import NUM_SAMPLES, Row
from .scoring import SCORED

PRESETS = ("table1", "lcm", "teacher")
IMAGE_FORMAT = "float32"
VAE_PSNR_COUNT = 512      # held-out images of the teacher preset's VAE round trip
JUDGE_REAL_COUNT = 1000   # held-out real images the teacher preset's judge ceiling is measured on

# One row per (model, sampler, steps, guidance g) of the LCM-vs-teacher table.
LCM_TABLE_ROWS = (
    *(Row("lcm", LCM_SAMPLER, n, LCM_GUIDANCE) for n in (1, 2, 4, 8)),
    *(Row("teacher", s, n, TEACHER_GUIDANCE) for s in ("ddim", "dpm-solver++") for n in (1, 2, 4)),
    Row("teacher", "ddim", TEACHER_STEPS, TEACHER_GUIDANCE),
)


def lcm_preset_rows(lcm_guidance: float, guidance: float | None = None) -> list[Row]:
    """``LCM_TABLE_ROWS`` with the LCM rows at ``lcm_guidance`` (the LCM's own default g), or every row at
    ``guidance`` when one is given."""
    if guidance is not None:
        return [r._replace(guidance=guidance) for r in LCM_TABLE_ROWS]
    return [r._replace(guidance=lcm_guidance) if r.model == "lcm" else r for r in LCM_TABLE_ROWS]


# the scores a preset row carries beside the judge's accuracies: the distribution metrics and the caption score
EXTRA_METRICS = ("fid", "kid", "kid_std", "precision", "recall", "caption_score", "histogram_distance", "fid_ci")
_ROW_PROPERTIES = {k: v for k, v in scoring.SCORE_PROPERTIES.items() if k in EXTRA_METRICS}
_JUDGED = {"type": "object", "required": ["sampler", "steps", "guidance", "num_samples", "attribute_accuracy",
                                          "exact_match", "unet_evals_per_image", "seconds", "fid", "kid",
                                          "kid_std", "precision", "recall", "histogram_distance"],
           "properties": {"attribute_accuracy": {"type": "object", "additionalProperties": {"type": "number"}},
                          "exact_match": {"type": "number", "minimum": 0, "maximum": 1},
                          "unet_evals_per_image": {"type": "number", "minimum": 0}, **_ROW_PROPERTIES}}
LCM_RESULTS_SCHEMA = {"type": "object", "required": ["num_samples", "seed", "rows", "reference", "floor"],
                      "properties": {"rows": {"type": "array", "minItems": 1, "items": _JUDGED},
                                     "floor": results_file.FLOOR_SCHEMA,
                                     "timestep_schedules": results_file.TIMESTEP_SCHEDULES_SCHEMA}}
TEACHER_RESULTS_SCHEMA = {"allOf": [_JUDGED, {"type": "object",
                                              "required": ["paraphrase_accuracy", "paraphrase", "vae_psnr_db",
                                                           "judge_on_real_images", "reference", "floor"],
                                              "properties": {"paraphrase": _JUDGED,
                                                             "floor": results_file.FLOOR_SCHEMA}}]}


def judged_row(bundle, row: Row, extractor, reference, out: Path, num_samples: int = NUM_SAMPLES,
               split: str = "heldout", seed: int = 0, batch_size: int = 32, bootstrap: int = 0,
               per_image: dict | None = None) -> tuple[dict, object]:
    """One row in the presets' layout (``attribute_accuracy`` unrounded), and its images.

    Image i uses prompt i of ``heldout_prompts(num_samples, split=split)`` and seed ``seed + i``;
    UNet evaluations are counted, not assumed (LCM: one per step; CFG teacher: two). ``per_image``: a dict
    that receives the row's ``scoring.per_image_values`` under ``row.key`` (what sampling intervals resample).
    """
    prompts = [p for p, _ in references.heldout_prompts(num_samples, split=split)]
    scores, images, timing = pipeline.generate_and_score(
        bundle, row, prompts, extractor, reference, Path(out) / "samples", seed=seed, batch_size=batch_size,
        image_format=IMAGE_FORMAT, tag="" if split == "heldout" else split, bootstrap=bootstrap,
        per_image=per_image is not None)
    if per_image is not None:
        per_image[row.key] = scores.pop("per_image")
    extra = scoring.rounded({k: v for k, v in scores.items() if k in EXTRA_METRICS})
    return {"key": row.key, "sampler": row.sampler, "steps": row.steps, "guidance": row.guidance, "num_samples": num_samples,
            "split": split, "attribute_accuracy": scores["attribute_accuracy"],
            "exact_match": round(scores["exact_match"], 4), "unet_evals_per_image": timing["unet_evals"],
            "seconds": timing["seconds"], "seconds_per_image": round(timing["seconds"] / num_samples, 4),
            **extra}, images


def lcm_table(bundles: dict, extractor, out: Path, num_samples: int = NUM_SAMPLES, rows=LCM_TABLE_ROWS,
              batch_size: int = 32, seed: int = 0, reference: str = "prompt-scenes", cache_dir: Path | None = None,
              bootstrap: int = 0, meta: dict | None = None, intervals: int = 0) -> dict:
    """Preset ``lcm``: every row (model name, sampler, steps, g) on the same prompts and seeds; writes
    results.json, results.md and grids/ into ``out``.

    Args:
        bundles: model name -> Bundle, e.g. {"lcm": ..., "teacher": ...}.
        meta: entries put first in results.json (the CLI's model folders).
        intervals: > 0: that many resamples of every row's 95% sampling intervals, and of the paired
            difference of each teacher row to the LCM at the same step count (``comparisons.attach``).
    """
    out = Path(out)
    ref = references.reference_set(extractor, reference, cache_dir=cache_dir)
    records, values = [], {} if intervals else None
    for row in rows:
        record, images = judged_row(bundles[row.model], row, extractor, ref, out, num_samples, seed=seed,
                                    batch_size=batch_size, bootstrap=bootstrap, per_image=values)
        save_grid(scoring.model_images(images[:32]), out / "grids" / f"{row.key}.png")
        records.append({"model": row.model, **record})
    results = {**(meta or {}), "num_samples": num_samples, "seed": seed, "rows": records,
               "timestep_schedules": results_file.own_schedules(bundles), **_reference_entries(extractor, ref),
               "floor": scoring.floor(extractor, ref, num_samples)}
    if intervals:
        view = {"records": records, "num_samples": num_samples, "reference_kind": ref.kind,
                "timestep_schedules": results["timestep_schedules"]}
        comparisons.attach(view, values, ref.features, baseline=LCM_SAMPLER, num_resamples=intervals)
        results["interval_settings"] = view["interval_settings"]
    results_file.validate_results(results, LCM_RESULTS_SCHEMA)
    results_file.write_results(out / "results.json", results)
    write_text(out / "results.md", markdown_table(records, results["floor"]))
    return results


def teacher(bundle, extractor, out: Path, num_samples: int = NUM_SAMPLES, sampler: str = TEACHER_SAMPLER,
            steps: int = TEACHER_STEPS, guidance: float = TEACHER_GUIDANCE, batch_size: int = 32,
            seed: int = 0, reference: str = "prompt-scenes", cache_dir: Path | None = None,
            bootstrap: int = 0) -> tuple[dict, object]:
    """Preset ``teacher``: the held-out row, the paraphrase row (``paraphrase_accuracy``, and all its
    scores under ``paraphrase``), ``vae_psnr_db``, ``judge_on_real_images`` and the floor. Writes
    results.json, heldout-grid.png and prompts.txt into ``out``; returns (results, held-out images)."""
    out = Path(out)
    ref = references.reference_set(extractor, reference, cache_dir=cache_dir)
    row = Row("teacher", sampler, steps, guidance)
    result, images = judged_row(bundle, row, extractor, ref, out, num_samples, seed=seed, batch_size=batch_size,
                                bootstrap=bootstrap)
    para, _ = judged_row(bundle, row, extractor, ref, out, num_samples, split="paraphrase", seed=seed,
                         batch_size=batch_size, bootstrap=bootstrap)
    result.update(paraphrase_accuracy=para["attribute_accuracy"],
                  vae_psnr_db=round(scoring.vae_psnr(bundle.vae, VAE_PSNR_COUNT), 2),
                  judge_on_real_images=scoring.judge_on_real(extractor, ref, JUDGE_REAL_COUNT), paraphrase=para,
                  **_reference_entries(extractor, ref), floor=scoring.floor(extractor, ref, num_samples))
    results_file.validate_results(result, TEACHER_RESULTS_SCHEMA)
    results_file.write_results(out / "results.json", result)
    save_grid(scoring.model_images(images[:32]), out / "heldout-grid.png")
    prompts = [p for p, _ in references.heldout_prompts(min(32, num_samples))]
    write_text(out / "prompts.txt", "\n".join(prompts) + "\n")
    return result, images


def _reference_entries(extractor, ref) -> dict:
    return {"extractor": extractor.name, "extractor_version": extractor.version, "reference": ref.name,
            "reference_kind": ref.kind, "image_format": IMAGE_FORMAT}


def markdown_table(results: list[dict], floor: dict | None = None) -> str:
    """A Markdown table of ``lcm_table`` rows: accuracy in %, UNet evaluations, seconds, FID and KID x 10^3;
    then the real-image floor. With sampling intervals (``lcm_table(intervals=...)``) KID is the full-set
    value with its 95% interval and a column holds the paired difference to the LCM at the same step count;
    without, KID is the mean over reference subsets and their sd, named so (a spread of the reference alone,
    not a sampling interval)."""
    with_ci = any("intervals" in r for r in results)
    head = ["model", "sampler", "steps", "guidance", *SCORED, "UNet evals / image", "seconds", "s / image",
            "FID", "KID×10³ [95%]" if with_ci else "KID×10³ (subset sd)"]
    head += ["Δ KID to LCM [95%]"] if with_ci else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = [f"{100 * r['attribute_accuracy'][k]:.1f}" if k in r["attribute_accuracy"] else "-" for k in SCORED]
        cells = [r.get("model", "?"), r["sampler"], str(r["steps"]), f"{r['guidance']:g}", *acc,
                 f"{r['unet_evals_per_image']:g}", f"{r['seconds']:.1f}", f"{r['seconds_per_image']:.3f}",
                 f"{r['fid']:.2f}", scoring.kid_text(r)]
        if with_ci:
            d = r.get("paired", {}).get("kid")  # an LCM row is its own baseline: no difference to show
            cells.append("-" if d is None or r["sampler"] == LCM_SAMPLER
                         else f"{d['diff']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    if floor:
        acc = [f"{100 * floor['attribute_accuracy'][k]:.1f}" if k in floor["attribute_accuracy"] else "-"
               for k in SCORED]
        lines.append("| " + " | ".join([f"*real images (floor, n = {floor['num_samples']})*", "-", "-", "-", *acc,
                                        "-", "-", "-", f"{floor['fid']:.2f}",
                                        f"{floor['kid']:.2f} (subset mean)", *(["-"] if with_ci else [])]) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["PRESETS", "LCM_TABLE_ROWS", "lcm_preset_rows", "judged_row", "lcm_table", "teacher", "markdown_table",
           "LCM_RESULTS_SCHEMA", "TEACHER_RESULTS_SCHEMA", "table1_rows", "ode_row"]


def table1_rows(samplers: list[str], steps: list[int], guidance: float | None = None, *,
                lcm_steps: list[int] | None = None, guidance_max_t: int | None = None,
                lcm_schedules: list[str] | None = None, sweep_guidance: list[float] = (),
                ceiling: bool = False,
                lcm_guidance: float = LCM_GUIDANCE) -> tuple[list[Row], list[Row], list[Row] | None]:
    """Preset ``table1``: (rows, sweep, ceiling) for ``pipeline.run``.

    ``sweep``: every row again at each of ``sweep_guidance`` (rows already in the table left out).
    ``ceiling`` True: the teacher's guided ODE from t = T - 1 (DDIM trailing, TEACHER_STEPS steps) at the LCM's
    g (``guidance`` when given), what an LCM distils towards, and with ``guidance_max_t`` the same ODE under
    that guidance interval; None when False. ``lcm_guidance``: the LCM rows' g when ``guidance`` is None (the
    LCM's own default)."""
    options = dict(lcm_steps=lcm_steps, guidance_max_t=guidance_max_t, lcm_schedules=lcm_schedules,
                   lcm_guidance=lcm_guidance)
    rows = pipeline.table_rows(samplers, steps, guidance, **options)
    sweep = [r for g in sweep_guidance for r in pipeline.table_rows(samplers, steps, g, **options) if r not in rows]
    if not ceiling:
        return rows, sweep, None
    top = ode_row(lcm_guidance if guidance is None else guidance)
    return rows, sweep, [top] + ([top._replace(guidance_max_t=guidance_max_t)] if guidance_max_t is not None else [])


def ode_row(guidance: float, model: str = "teacher") -> Row:
    """Table 1's ceiling: the teacher's guided ODE at g solved finely from t = T - 1 (DDIM trailing,
    TEACHER_STEPS steps), what an LCM distils towards (LCD's guided PF-ODE, LCM Eq. 6 / Algorithm 1)."""
    from ..defaults import TRAILING

    return Row(model, "ddim" + TRAILING, TEACHER_STEPS, guidance)
