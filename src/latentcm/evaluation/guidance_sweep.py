"""LCM Fig. 4 as a trade-off: the teacher's guided ODE and LCMs swept over the guidance scale g.

At every g of the sweep the teacher's guided ODE (Table 1's ceiling row, ``presets.ode_row``: DDIM trailing,
50 steps from t = T - 1, the ODE that LCD distils, LCM Eq. 6) and every LCM at every step count are sampled on
the same held-out prompts and seeds (``pipeline.generate_and_score``) and scored by ``scoring.score``:

* against real images: KID and FID, and the judge's attribute accuracy (``accuracy``: the mean of its colour,
  background and shape accuracies), the two axes of the trade-off plot;
* against the ODE's own samples at the same g (*distillation fidelity*, an LCM row only): KID and FD of the
  LCM's images to the images it was distilled to reproduce (``scoring.reference_from_images``). Image i of both
  comes from the same prompt and noise, so KID is the paired estimator (``metrics.kid(paired=True)``: 0 for the
  ODE's own images, unbiased otherwise); it divides the features by the ODE images' RMS (``scoring.kid_scale``),
  so it is not on the scale of KID to real.

KID intervals (``resamples`` > 0) are 95% percentile-bootstrap intervals over prompts (``intervals``): to real
images with the reference drawn on its own, to the ODE with the ODE image of each drawn prompt drawn with it.
Each (model, steps) gets its best g: the lowest KID to real, with (``resamples`` > 0) the set of g *tied* with it --
those whose paired KID difference to it (``kid_gaps``) has a 95% interval reaching 0, so the sampling error cannot
rank them below it -- and its *following* of the ODE (``following``): its
background and shape accuracy at g = 1 beside the ODE's, and how much its mean object area (``scoring.object_area``)
rises from g = FOLLOW_FROM to FOLLOW_TO as a ratio to the ODE's rise on the same prompts and seeds, with a paired
bootstrap interval. With resamples it also reports how often each g is the best on a resample
(``resampled_best``), and how often an LCM's best g falls within one sweep point of the ODE's on the same resample.
Writes results.json, results.md, tradeoff.png and fidelity.png (``guidance_plots``) into its folder; samples are
cached in OUT/samples, so a rerun samples only what is new.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..defaults import LCM_SAMPLER
from ..files import write_text
from ..guidance import omega_from_guidance
from . import guidance_plots, intervals, pipeline, references, scoring
from .presets import ode_row
from .results import validate_results, write_results

GUIDANCES = (1.0, 1.5, 2.0, 3.0, 5.0, 8.5, 12.0)   # g (the paper's w = g - 1)
STEPS = (1, 2, 4)
ACCURACY_ATTRIBUTES = ("colour", "background", "shape")   # the y axis of the trade-off: their mean
TEACHER = "teacher"            # the teacher's key in the bundles dict
RESAMPLES = 200                # bootstrap resamples of the KID intervals
FOLLOW_FROM, FOLLOW_TO = 1.5, 8.5   # the object-area rise the guided ODE shows (its best g to the paper's default)
FOLLOW_AT = 1.0                # the accuracies compared at g = 1 (no guidance: the ODE's background drops)

_CI = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
_RECORD = {"type": "object", "required": ["model", "sampler", "steps", "guidance", "kid", "kid_std", "fid",
                                          "accuracy", "attribute_accuracy"],
           "properties": {"steps": {"type": "integer", "minimum": 1}, "guidance": {"type": "number", "minimum": 0},
                          "accuracy": {"type": ["number", "null"]}, "kid_ci": _CI,
                          "fidelity": {"type": "object", "required": ["kid", "kid_std", "fid"],
                                       "properties": {"kid_ci": _CI}}}}
SWEEP_SCHEMA = {"type": "object",
                "required": ["num_samples", "seed", "guidances", "steps", "records", "teacher_ode", "best", "floor"],
                "properties": {"records": {"type": "array", "items": _RECORD},
                               "teacher_ode": {"type": "array", "minItems": 1, "items": _RECORD},
                               "best": {"type": "array"}}}


def mean_accuracy(attribute_accuracy: dict[str, float]) -> float | None:
    """The trade-off's y: the mean of the judge's ACCURACY_ATTRIBUTES accuracies (those the prompts name)."""
    found = [attribute_accuracy[k] for k in ACCURACY_ATTRIBUTES if k in attribute_accuracy]
    return round(float(np.mean(found)), 4) if found else None


def kid_on_resamples(features: np.ndarray, reference: references.Reference, draws: intervals.Draws,
                     paired: bool = False) -> np.ndarray:
    """KID x 10^3 of judge ``features`` to ``reference`` on each resample of ``draws`` [R], scaled as
    ``scoring.score`` scales them (``paired``: reference image i belongs to image i)."""
    scale = scoring.kid_scale(reference.features)
    boot = intervals.kid_resamples(features.astype(np.float64) / scale, reference.features.astype(np.float64) / scale,
                                   draws.prompts, draws.reference, paired=paired)
    return scoring.KID_SCALE * np.asarray(boot, dtype=np.float64)


def _kid_ci(features: np.ndarray, reference: references.Reference, draws: intervals.Draws,
            paired: bool = False) -> list[float]:
    """95% percentile interval of ``kid_on_resamples``."""
    return [round(v, 4) for v in intervals.percentile_interval(kid_on_resamples(features, reference, draws, paired))]


def _record(row: pipeline.Row, scores: dict, timing: dict, area: np.ndarray) -> dict:
    return {"model": row.model, "sampler": row.sampler, "steps": row.steps, "guidance": row.guidance,
            "omega": round(omega_from_guidance(row.guidance), 6), **scoring.rounded(scores),
            "accuracy": mean_accuracy(scores["attribute_accuracy"]), "object_area": round(float(area.mean()), 5),
            **timing}


def _rise(areas: dict, key: tuple) -> np.ndarray | None:
    """Per image: its object area at FOLLOW_TO minus at FOLLOW_FROM (``areas``: (model, steps, g) -> [N])."""
    lo, hi = areas.get((*key, FOLLOW_FROM)), areas.get((*key, FOLLOW_TO))
    return None if lo is None or hi is None else hi - lo


def following(records: list[dict], teacher_ode: list[dict], areas: dict, draws: intervals.Draws | None) -> list[dict]:
    """Per (model, steps): does the LCM follow the guided ODE? Its background and shape accuracy at g = FOLLOW_AT
    beside the ODE's, and its object-area rise FOLLOW_FROM -> FOLLOW_TO over the ODE's (one ratio of two means
    over the same prompts and seeds; ``draws``: its paired 95% percentile interval). Entries lack what the
    sweep's g do not cover."""
    ode_at = {r["guidance"]: r for r in teacher_ode}
    ode_rise = _rise(areas, (TEACHER, None))
    out = []
    for model, n in dict.fromkeys((r["model"], r["steps"]) for r in records):
        entry = {"model": model, "steps": n}
        at = [r for r in records if r["model"] == model and r["steps"] == n and r["guidance"] == FOLLOW_AT]
        if at and FOLLOW_AT in ode_at:
            for k in ("background", "shape"):
                entry[k] = at[0]["attribute_accuracy"].get(k)
                entry[f"ode_{k}"] = ode_at[FOLLOW_AT]["attribute_accuracy"].get(k)
        rise = _rise(areas, (model, n))
        if rise is not None and ode_rise is not None:
            entry.update(area_rise=round(float(rise.mean()), 5), ode_area_rise=round(float(ode_rise.mean()), 5),
                         area_rise_ratio=round(float(rise.mean() / ode_rise.mean()), 4))
            if draws is not None:
                ratios = (draws.prompts @ rise) / (draws.prompts @ ode_rise)
                entry["area_rise_ratio_ci"] = [round(v, 4) for v in intervals.percentile_interval(ratios)]
        out.append(entry)
    return out


def _fidelity(features: np.ndarray, ode_ref, draws) -> dict:
    """KID (x 10^3, with its std over subsets) and FD of an LCM's judge features to the ODE's images' at the same
    g; the two sets share prompts and noise, so KID leaves out each image's own ODE image (paired)."""
    out = scoring.rounded(scoring.distances(features, ode_ref, paired=True))
    return {**out, "kid_ci": _kid_ci(features, ode_ref, draws, paired=True)} if draws else out


def sweep(bundles: dict, lcm_names: list[str], extractor, out: Path, guidances=GUIDANCES, steps=STEPS,
          num_samples: int = pipeline.NUM_SAMPLES, batch_size: int = 32, seed: int = 0,
          reference: str = "prompt-scenes", cache_dir: Path | None = None, resamples: int = RESAMPLES) -> dict:
    """Sample and score the teacher's guided ODE (``bundles[TEACHER]``) and each LCM of ``lcm_names`` (keys of
    ``bundles``) at every g of ``guidances`` and every count of ``steps``; write the report into ``out``.
    Returns the results dict (LCM rows in "records", the ODE's in "teacher_ode", each curve's best g in "best")."""
    out = Path(out)
    prompts = [p for p, _ in references.heldout_prompts(num_samples)]
    ref = references.reference_set(extractor, reference, cache_dir=cache_dir)
    real_draws = intervals.draw(num_samples, len(ref.features), resamples, seed=0) if resamples else None
    ode_draws = (intervals.draw(num_samples, num_samples, resamples, seed=1, reference_follows_prompts=True)
                 if resamples else None)
    common = dict(seed=seed, batch_size=batch_size)
    records, teacher_ode, areas, features = [], [], {}, {(TEACHER, None): {}}
    for g in tqdm(guidances, desc="guidance sweep"):
        row = ode_row(g, TEACHER)
        scores, ode_images, timing = pipeline.generate_and_score(bundles[TEACHER], row, prompts, extractor, ref,
                                                                 out / "samples", per_image=True, **common)
        ode_features = features[TEACHER, None][g] = scores.pop("per_image")["features"]
        areas[TEACHER, None, g] = scoring.object_area(ode_images)
        teacher_ode.append(_record(row, scores, timing, areas[TEACHER, None, g]))
        if real_draws:
            teacher_ode[-1]["kid_ci"] = _kid_ci(ode_features, ref, real_draws)
        ode_ref = scoring.reference_from_images(ode_images, extractor, f"teacher-ode-g{g:g}")
        for name in lcm_names:
            for n in steps:
                row = pipeline.Row(name, LCM_SAMPLER, n, g)
                scores, images, timing = pipeline.generate_and_score(bundles[name], row, prompts, extractor, ref,
                                                                     out / "samples", per_image=True, **common)
                feats = features.setdefault((name, n), {})[g] = scores.pop("per_image")["features"]
                areas[name, n, g] = scoring.object_area(images)
                records.append({**_record(row, scores, timing, areas[name, n, g]),
                                "fidelity": _fidelity(feats, ode_ref, ode_draws)})
                if real_draws:
                    records[-1]["kid_ci"] = _kid_ci(feats, ref, real_draws)
    results = {"num_samples": num_samples, "seed": seed, "guidances": list(guidances), "steps": list(steps),
               "models": {k: str(b.path) for k, b in bundles.items()}, "extractor": extractor.name,
               "extractor_version": extractor.version, "reference": ref.name, "reference_kind": ref.kind,
               "resamples": resamples, "teacher_ode_row": {"sampler": ode_row(0).sampler, "steps": ode_row(0).steps},
               "records": records, "teacher_ode": teacher_ode,
               "best": best_guidance(records, teacher_ode,
                                     *_curve_stats(records, teacher_ode, features, ref, real_draws)),
               "following": following(records, teacher_ode, areas, real_draws),
               "floor": scoring.floor(extractor, ref, num_samples)}
    results["floor"]["accuracy"] = mean_accuracy(results["floor"]["attribute_accuracy"])
    validate_results(results, SWEEP_SCHEMA)
    write_report(results, out)
    return results


def _curve_stats(records: list[dict], teacher_ode: list[dict], features: dict, reference,
                 draws) -> tuple[dict | None, dict | None]:
    """Every curve's ``kid_gaps`` and its best g on each resample (``resampled_best``); all curves on the same
    resamples of prompts and reference. (None, None) without ``draws``."""
    if draws is None:
        return None, None
    rows = {(TEACHER, None): teacher_ode}
    for r in records:
        rows.setdefault((r["model"], r["steps"]), []).append(r)
    kids = {key: curve_kids(features[key], reference, draws) for key in rows}
    return ({key: _gaps(kids[key], _lowest_kid(found)["guidance"]) for key, found in rows.items()},
            {key: resampled_best(k) for key, k in kids.items()})


def _lowest_kid(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["kid"])


def curve_kids(features: dict[float, np.ndarray], reference: references.Reference,
               draws: intervals.Draws) -> dict[float, np.ndarray]:
    """Per g of one curve (``features``: g -> judge features [N], the same prompts and seeds at every g): its KID
    x 10^3 to real on each resample of ``draws`` [R], every g on the same resamples (``intervals.resample``)."""
    scale = scoring.kid_scale(reference.features)
    rows = {g: f.astype(np.float64) / scale for g, f in features.items()}
    _, boot = intervals.resample(rows, reference.features.astype(np.float64) / scale, "kid", draws)
    return {g: scoring.KID_SCALE * np.asarray(boot[g], dtype=np.float64) for g in rows}


def kid_gaps(features: dict[float, np.ndarray], best: float, reference: references.Reference,
             draws: intervals.Draws) -> dict[float, list[float]]:
    """Per g: the 95% percentile interval of its KID x 10^3 to real minus the ``best`` g's, both on the same
    resamples (``curve_kids``), so what the rows share cancels. The best g's own gap is [0, 0]."""
    return _gaps(curve_kids(features, reference, draws), best)


def _gaps(kids: dict[float, np.ndarray], best: float) -> dict[float, list[float]]:
    return {g: [round(v, 4) for v in intervals.percentile_interval(k - kids[best])] for g, k in kids.items()}


def resampled_best(kids: dict[float, np.ndarray]) -> np.ndarray:
    """The g of lowest KID on each resample (``curve_kids``' output) [R]: how often the data pick each g."""
    order = sorted(kids)
    return np.asarray(order)[np.argmin(np.stack([kids[g] for g in order]), axis=0)]


def _tied(gaps: dict[float, list[float]]) -> list[float]:
    """The g whose gap to the best g reaches 0: not resolved worse than it."""
    return sorted(g for g, ci in gaps.items() if ci[0] <= 0)


def _points_apart(order: list[float], a: list[float], b: list[float]) -> int:
    """The fewest sweep points between a g of ``a`` and a g of ``b`` (0 when the sets share one)."""
    return min(abs(order.index(x) - order.index(y)) for x in a for y in b)


def best_guidance(records: list[dict], teacher_ode: list[dict], gaps: dict | None = None,
                  resampled: dict | None = None) -> list[dict]:
    """Per (model, steps): the g of lowest KID to real, and how many sweep points it lies from the ODE's best g
    (Fig. 4's question: does the LCM's curve have the teacher's shape?). ``gaps`` ((model, steps) -> ``kid_gaps``,
    the ODE's under (TEACHER, None)) adds each curve's g tied with its best ("tied", "kid_gap_ci") and, per LCM,
    the fewest sweep points between its tied g and the ODE's ("tied_sweep_points_from_teacher"). ``resampled``
    (the same keys -> ``resampled_best``, all on the same resamples) adds each g's share of resamples on which it is
    the best ("best_share") and, per LCM, the share on which its best g is within one sweep point of the ODE's
    ("within_one_point_share"): how often the point-estimate verdict would come out so on a new draw."""
    order = sorted({r["guidance"] for r in teacher_ode + records})
    ode = _lowest_kid(teacher_ode)

    def entry(key: tuple, top: dict) -> dict:
        out = {"model": key[0], "steps": top["steps"], "guidance": top["guidance"], "kid": top["kid"]}
        if gaps and key in gaps:
            out.update(tied=_tied(gaps[key]), kid_gap_ci={f"{g:g}": ci for g, ci in gaps[key].items()})
        if resampled and key in resampled:
            out["best_share"] = {f"{g:g}": round(float(np.mean(resampled[key] == g)), 4) for g in order
                                 if np.any(resampled[key] == g)}
        return out

    best = [entry((TEACHER, None), ode)]
    for model, n in dict.fromkeys((r["model"], r["steps"]) for r in records):
        found = entry((model, n), _lowest_kid([r for r in records if r["model"] == model and r["steps"] == n]))
        found.update(teacher_guidance=ode["guidance"],
                     sweep_points_from_teacher=_points_apart(order, [found["guidance"]], [ode["guidance"]]))
        if "tied" in found and "tied" in best[0]:
            found["tied_sweep_points_from_teacher"] = _points_apart(order, found["tied"], best[0]["tied"])
        if resampled and (model, n) in resampled and (TEACHER, None) in resampled:
            apart = [_points_apart(order, [a], [b]) for a, b in zip(resampled[model, n], resampled[TEACHER, None])]
            found["within_one_point_share"] = round(float(np.mean(np.asarray(apart) <= 1)), 4)
        best.append(found)
    return best


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _table(rows: list[dict], fidelity: bool) -> list[str]:
    head = ["g (w)", "KID×10³ to real [95%]", "FID", "accuracy %", *ACCURACY_ATTRIBUTES, "object area %"]
    head += ["fidelity: KID×10³ to the ODE [95%]", "fidelity: FD to the ODE"] if fidelity else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['guidance']:g} ({r['omega']:g})", scoring.kid_text(r), f"{r['fid']:.2f}", _pct(r["accuracy"]),
                 *(_pct(r["attribute_accuracy"].get(k)) for k in ACCURACY_ATTRIBUTES), _pct(r.get("object_area"))]
        cells += [scoring.kid_text(r["fidelity"]), f"{r['fidelity']['fid']:.2f}"] if fidelity else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """results.md: the ODE's table, one table per (model, steps) with fidelity, the best g per curve, the floor."""
    ode = results["teacher_ode_row"]
    lines = ["# Guidance sweep (LCM Fig. 4)", "",
             f"n = {results['num_samples']} held-out prompts and seeds per row; reference {results['reference']} "
             f"({results['reference_kind']}); accuracy: the judge's mean of {', '.join(ACCURACY_ATTRIBUTES)}. "
             "Fidelity: the LCM's images against the teacher ODE's at the same g, prompts and seeds (KID on features "
             "scaled by the ODE images' RMS).", "",
             f"## Teacher, guided ODE ({ode['sampler']}, {ode['steps']} steps from t = 999)", ""]
    lines += _table(results["teacher_ode"], fidelity=False)
    for model, n in dict.fromkeys((r["model"], r["steps"]) for r in results["records"]):
        lines += ["", f"## {model}, {n} step{'s' if n > 1 else ''}", ""]
        lines += _table([r for r in results["records"] if r["model"] == model and r["steps"] == n], fidelity=True)
    lines += _best_table(results["best"])
    lines += _following_table(results.get("following", []))
    f = results["floor"]
    lines += ["", f"Real images (floor, n = {f['num_samples']}): KID×10³ {f['kid']:.2f} (mean over reference subsets), "
              f"FID {f['fid']:.2f}, accuracy {_pct(f['accuracy'])}%."]
    return "\n".join(lines) + "\n"


def _best_table(best: list[dict]) -> list[str]:
    """The best-g table; with gaps, the g tied with each best g (a paired KID difference whose interval reaches 0)."""
    tied = all("tied" in b for b in best)
    head = "| model | steps | best g | KID×10³ | sweep points from the ODE's best g |"
    lines = ["", "## Best g (lowest KID to real)", ""]
    if tied:
        lines += ["Tied: the g whose KID×10³ minus the best g's, on the same resamples of prompts and reference, "
                  "has a 95% interval reaching 0 (each gap's interval in results.json, `kid_gap_ci`).", ""]
        head += " g tied with the best | sweep points between the tied g and the ODE's |"
    shares = all("best_share" in b for b in best)
    if shares:
        lines += ["Resamples: on each resample of prompts and reference (the same for every curve) the g of lowest "
                  "KID; the share of resamples each g wins, and the share on which the LCM's best g is within one "
                  "sweep point of the ODE's best g on that resample.", ""]
        head += " best g on resamples | within one sweep point of the ODE's |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for b in best:
        cells = [b["model"], str(b["steps"]), f"{b['guidance']:g}", f"{b['kid']:.2f}",
                 str(b.get("sweep_points_from_teacher", "-"))]
        if tied:
            cells += [", ".join(f"{g:g}" for g in b["tied"]), str(b.get("tied_sweep_points_from_teacher", "-"))]
        if shares:
            won = sorted(b["best_share"].items(), key=lambda kv: -kv[1])
            within = b.get("within_one_point_share")
            cells += [", ".join(f"{g}: {100 * v:.0f}%" for g, v in won),
                      "-" if within is None else f"{100 * within:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _following_table(entries: list[dict]) -> list[str]:
    """The "does it follow the ODE?" table of ``following``'s entries."""
    if not entries:
        return []
    lines = ["", "## Does the LCM follow the ODE?", "",
             f"Accuracy at g = {FOLLOW_AT:g} (the ODE's without guidance) and the rise of the mean object area from "
             f"g = {FOLLOW_FROM:g} to {FOLLOW_TO:g} as a share of the ODE's rise on the same prompts and seeds "
             "(95% paired bootstrap interval over prompts).", "",
             f"| model | steps | background % at g = {FOLLOW_AT:g} (ODE) | shape % at g = {FOLLOW_AT:g} (ODE) | "
             "area rise, points (ODE) | rise / ODE's rise [95% CI] |", "|---|---|---|---|---|---|"]
    for e in entries:
        acc = [f"{_pct(e.get(k))} ({_pct(e.get('ode_' + k))})" if k in e else "-" for k in ("background", "shape")]
        rise = (f"{100 * e['area_rise']:.2f} ({100 * e['ode_area_rise']:.2f})" if "area_rise" in e else "-")
        ci = e.get("area_rise_ratio_ci")
        ratio = (f"{e['area_rise_ratio']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                 if "area_rise_ratio" in e else "-")
        lines.append(f"| {e['model']} | {e['steps']} | {acc[0]} | {acc[1]} | {rise} | {ratio} |")
    return lines


def write_report(results: dict, out: Path) -> None:
    """results.json, results.md, tradeoff.png and fidelity.png into ``out``."""
    out = Path(out)
    write_results(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
    guidance_plots.plot_tradeoff(results, out / "tradeoff.png")
    guidance_plots.plot_fidelity(results, out / "fidelity.png")


__all__ = ["sweep", "best_guidance", "kid_gaps", "curve_kids", "kid_on_resamples", "resampled_best", "following", "mean_accuracy", "markdown", "write_report",
           "GUIDANCES", "STEPS", "ACCURACY_ATTRIBUTES", "TEACHER", "SWEEP_SCHEMA"]
