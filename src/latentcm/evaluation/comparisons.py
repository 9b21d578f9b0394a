"""Sampling intervals and paired comparisons of a results dict's rows (``intervals`` does the statistics).

Every row of one evaluation holds the same prompts and seeds (image i: prompt i, seed ``seed + i``), so
``attach`` resamples the prompts once for every row, jointly with the reference, and gives each row

* ``intervals``: the percentile 95% interval of every headline metric -- KID (x 10^3, the full-set unbiased
  MMD^2 at ``score``'s feature scale), FID (on the first FID_RESAMPLES resamples), caption score, exact match
  and each attribute's accuracy;
* ``paired``: the difference row - baseline of every metric on the same resamples, with its interval, to the
  row of the named baseline method (a sampler: ``baseline_method``) at the same step count -- the table's own
  row for a table row, the one at the same guidance g for a sweep row;

and, with a guidance sweep, ``results["best_guidance"]``: each method at each step count at its own best g
(lowest KID of the table and the sweep) with the paired difference to the baseline at *its* best g. The best
g is picked on the same images the interval is computed on, so that interval leaves out the choice of g.
"""
from __future__ import annotations

import numpy as np

from . import intervals as iv
from .scoring import KID_SCALE, ROUNDING, kid_scale

MEANS = ("caption_score", "exact_match")  # per-image means; each attribute's accuracy is one too
# FID's resamples cost a covariance and an eigendecomposition each (tens of ms at D = 256 on one CPU thread,
# about 20 times a KID resample): it takes the first FID_RESAMPLES of the draws, every row the same ones
FID_RESAMPLES = 200


def method_of(record: dict) -> tuple:
    """What tells one method's rows apart: (sampler, guidance interval, timestep schedule)."""
    return record["sampler"], record.get("guidance_max_t"), record.get("schedule")


def baseline_method(records: list[dict], sampler: str, own_schedules: dict[str, str] | None = None) -> tuple:
    """The method the rows are compared with: ``sampler``'s rows at full guidance; of an LCM's rows on several
    timestep schedules, those on the model's own (``own_schedules``: model -> schedule)."""
    found = sorted({(method_of(r), r.get("model", "")) for r in records
                    if r["sampler"] == sampler and r.get("guidance_max_t") is None}, key=str)
    if not found:
        raise ValueError(f"baseline {sampler!r} is not a sampler of the table's rows: "
                         f"{', '.join(sorted({r['sampler'] for r in records}))}")
    own = [m for m, model in found if m[2] in (None, (own_schedules or {}).get(model))]
    return own[0] if own else found[0][0]


def _kid(record: dict) -> float:
    """The KID a row is ranked by: its interval's full-set value when it has one, else the mean over subsets."""
    return record["intervals"]["kid"]["value"] if "intervals" in record else record["kid"]


def best_guidance(records: list[dict]) -> dict[tuple, dict]:
    """(method, steps) -> the record of lowest KID among ``records`` (a method at each of its guidance scales)."""
    best = {}
    for r in records:
        at = (method_of(r), r["steps"])
        if at not in best or _kid(r) < _kid(best[at]):
            best[at] = r
    return best


def _metric_values(per_image: dict[str, dict], keys: list[str], reference: np.ndarray, draws: iv.Draws) -> dict:
    """metric -> (point {key: value}, boot {key: [P]}) for KID (x 10^3), FID and every per-image mean."""
    scale = kid_scale(reference)
    ref = np.asarray(reference, np.float64)
    out = {}
    point, boot = iv.resample({k: per_image[k]["features"] / scale for k in keys}, ref / scale, "kid", draws)
    out["kid"] = ({k: KID_SCALE * v for k, v in point.items()}, {k: KID_SCALE * v for k, v in boot.items()})
    few = iv.Draws(draws.prompts[:FID_RESAMPLES], draws.reference[:FID_RESAMPLES])
    out["fid"] = iv.resample({k: per_image[k]["features"] for k in keys}, ref, "fid", few)
    for metric in MEANS:
        out[metric] = iv.resample({k: per_image[k][metric] for k in keys}, None, "mean", draws)
    attributes = sorted(set.intersection(*(set(per_image[k]["attribute_accuracy"]) for k in keys)))
    for a in attributes:
        out[f"attribute_accuracy.{a}"] = iv.resample({k: per_image[k]["attribute_accuracy"][a] for k in keys},
                                                     None, "mean", draws)
    return out


def _nest(flat: dict) -> dict:
    """{"attribute_accuracy.colour": x, "kid": y} -> {"attribute_accuracy": {"colour": x}, "kid": y}."""
    out = {}
    for name, value in flat.items():
        head, _, tail = name.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[head] = value
    return out


def _round(metric: str, values: list[float]) -> list[float]:
    return [round(float(v), ROUNDING[metric.partition(".")[0]]) for v in values]


def _row_intervals(stats: dict, key: str, alpha: float) -> dict:
    return _nest({m: {"value": _round(m, [point[key]])[0], "ci": _round(m, iv.percentile_interval(boot[key], alpha))}
                  for m, (point, boot) in stats.items()})


def _row_paired(stats: dict, key: str, base: str, alpha: float) -> dict:
    diffs = {}
    for m, (point, boot) in stats.items():
        d = iv.paired(point, boot, key, base, alpha)
        diffs[m] = {"diff": _round(m, [d["diff"]])[0], "ci": _round(m, d["diff_ci"])}
    return {"baseline": base, **_nest(diffs)}


def _matched_baselines(results: dict, base: tuple) -> list[tuple[dict, dict]]:
    """(row, baseline row) pairs: a table row with the baseline's table row at its step count, a sweep row
    with the baseline's row at its step count and guidance."""
    records, sweep = results["records"], results.get("sweep", [])
    by_steps = {r["steps"]: r for r in records if method_of(r) == base}
    by_g = {(r["steps"], r["guidance"]): r for r in records + sweep if method_of(r) == base}
    pairs = [(r, by_steps[r["steps"]]) for r in records if r["steps"] in by_steps]
    return pairs + [(r, by_g[(r["steps"], r["guidance"])]) for r in sweep if (r["steps"], r["guidance"]) in by_g]


def attach(results: dict, per_image: dict[str, dict], reference: np.ndarray, *, baseline: str | None,
           num_resamples: int = iv.NUM_RESAMPLES, seed: int = 0, alpha: float = iv.ALPHA) -> dict:
    """Add ``intervals`` to every row of ``results`` (records, sweep, ceilings), ``paired`` to every row that
    has a baseline row, ``best_guidance`` with a sweep, and ``interval_settings``; returns ``results``.

    Args:
        per_image: row key -> ``scoring.per_image_values`` of that row's images; each row's "key" names its entry.
        reference: the reference set's features [M, D].
        baseline: the sampler of the baseline method (``baseline_method``), or None for intervals only.
    """
    rows = results["records"] + results.get("sweep", []) + ([results["ceiling"]] if "ceiling" in results else [])
    rows += results.get("ceilings", [])
    keys = list(dict.fromkeys(r["key"] for r in rows))
    base = None if baseline is None else baseline_method(results["records"], baseline, results.get("timestep_schedules"))
    follows = results.get("reference_kind") == "prompt-scenes" and len(reference) == results["num_samples"]
    draws = iv.draw(results["num_samples"], len(reference), num_resamples, seed, reference_follows_prompts=follows)
    stats = _metric_values(per_image, keys, reference, draws)
    for r in rows:
        r["intervals"] = _row_intervals(stats, r["key"], alpha)
    settings = {"method": "percentile bootstrap over prompts and seeds (one draw for every row), the reference "
                          + ("resampled with the prompts" if follows else "resampled on its own, one draw for every row"),
                "confidence": 1 - alpha, "num_resamples": num_resamples,
                "fid_resamples": min(num_resamples, FID_RESAMPLES), "seed": seed}
    if base is not None:
        for r, b in _matched_baselines(results, base):
            r["paired"] = _row_paired(stats, r["key"], b["key"], alpha)
        settings["baseline"] = {"sampler": base[0], "guidance_max_t": base[1], "schedule": base[2]}
        if results.get("sweep"):
            best = best_guidance(results["records"] + results["sweep"])
            results["best_guidance"] = [
                {"key": r["key"], "guidance": r["guidance"], "steps": steps,
                 "baseline_guidance": best[(base, steps)]["guidance"],
                 "paired": _row_paired(stats, r["key"], best[(base, steps)]["key"], alpha)}
                for (method, steps), r in best.items() if (base, steps) in best]
    results["interval_settings"] = settings
    return results


__all__ = ["attach", "baseline_method", "best_guidance", "method_of", "MEANS"]
