"""Reports of results dicts: table1.md (``results_markdown``: Table 1, the ceiling and floor rows, each
method at its best guidance; with sampling intervals, each KID with its 95% interval, the paired difference to
the baseline method as a column and every metric's intervals in ``intervals_markdown``) and the FID /
caption-score plots against steps (``plot_against_steps``)."""
from __future__ import annotations

from pathlib import Path

from ..defaults import LCM_SAMPLER, TEACHER_SOLVERS, TRAILING
from ..guidance import omega_from_guidance
from .comparisons import best_guidance
from . import scoring
from .results import TABLE_SAMPLERS

SAMPLER_LABELS = {"ddim": "DDIM", "dpm-solver": "DPM-Solver", "dpm-solver++": "DPM-Solver++", "lcm": "LCM"}
SAMPLER_LABELS.update({s + TRAILING: SAMPLER_LABELS[s] + " trailing" for s in TEACHER_SOLVERS})


def ceilings(results: dict) -> list[dict]:
    """The ceiling records of a results dict: results["ceiling"], then results["ceilings"] (either may be absent)."""
    return ([results["ceiling"]] if "ceiling" in results else []) + list(results.get("ceilings", []))


def hlines(results: dict) -> dict:
    """The reference levels of a Table 1 plot: the real-image floor and every ceiling, by label."""
    lines = {"real images (floor)": results["floor"]}
    for top in ceilings(results):
        lines[f"ceiling: {method_label(top, True)}"] = top
    return lines


def method_label(r: dict, with_steps: bool = False) -> str:
    """A record's method and guidance: "LCM, w 7.5" (the paper's w = g - 1), "DDIM trailing, 50 steps, g 8.5",
    ", guided t <= T" for a guidance interval and ", refine timesteps" for an LCM row's named schedule."""
    name = SAMPLER_LABELS[r["sampler"]] + (f", {r['steps']} steps" if with_steps else "")
    if r["sampler"] == LCM_SAMPLER:
        name = f"{name}, w {omega_from_guidance(r['guidance']):g}"
    else:
        name = f"{name}, g {r['guidance']:g}"
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


def baseline_label(results: dict) -> str | None:
    """The method the paired differences are taken to ("LCM, refine timesteps"), or None without them."""
    base = results.get("interval_settings", {}).get("baseline")
    if not base:
        return None
    return ", ".join([SAMPLER_LABELS[base["sampler"]], *_variant_words((base["guidance_max_t"], base["schedule"]))])


def results_markdown(results: dict) -> str:
    """table1.md: Table 1 at the rows' guidance, the ceiling and floor rows, the best-guidance table of a sweep
    and, when results carry sampling intervals, every metric's intervals and paired differences."""
    base = baseline_label(results)
    text = table1_markdown(results["records"], results.get("floor"), ceilings(results), base)
    if results.get("sweep"):
        text += "\n" + best_guidance_markdown(results["records"] + results["sweep"], results.get("best_guidance"), base)
    if "interval_settings" in results:
        text += "\n" + intervals_markdown(results, base)
    return text


def _interval(value: float, ci: list[float], signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _diff_cell(r: dict, metric: str = "kid", scale: float = 1.0) -> str:
    """A paired difference to the baseline row, bold when its 95% interval excludes 0; "baseline" on that row."""
    if "paired" not in r:
        return "-"
    if r["paired"]["baseline"] == r.get("key"):
        return "baseline"
    d = r["paired"][metric]
    cell = _interval(scale * d["diff"], [scale * v for v in d["ci"]], signed=True)
    return f"**{cell}**" if d["ci"][0] > 0 or d["ci"][1] < 0 else cell


def table1_markdown(records: list[dict], floor_scores: dict | None = None,
                    ceiling: dict | list[dict] | None = None, baseline: str | None = None) -> str:
    """The paper's Table 1 layout: a row per sampler (with its guidance: g, and the LCM's w = g - 1), FID,
    KID (x 10^3: the mean over subsets with their sd, or with sampling intervals the value and its 95% interval), score and
    exact accuracy columns per step count; with paired differences (``baseline`` names the method) the column
    of KID's difference to the baseline's row at each step count; then the teacher's guided-ODE ceiling and the
    real-image floor (each the same value in every column)."""
    steps = sorted({r["steps"] for r in records})
    paired = baseline is not None and any("paired" in r for r in records)
    head = (["method"] + [f"FID {n}" for n in steps] + [f"KID×10³ {n}" for n in steps]
            + ([f"Δ KID×10³ {n} vs {baseline}" for n in steps] if paired else [])
            + [f"score {n}" for n in steps] + [f"exact acc. {n}" for n in steps])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label, by_steps, with_diff=True):
        def cell(n, fmt):
            return fmt(by_steps[n]) if n in by_steps else "-"
        diffs = [cell(n, _diff_cell) if with_diff else "-" for n in steps] if paired else []
        return ("| " + " | ".join([label] + [cell(n, lambda r: f"{r['fid']:.2f}") for n in steps]
                                  + [cell(n, scoring.kid_text) for n in steps] + diffs
                                  + [cell(n, lambda r: f"{r['caption_score']:.1f}") for n in steps]
                                  + [cell(n, lambda r: f"{r['exact_match']:.1%}") for n in steps]) + " |")
    for sampler, variant in _methods(records):
        mine = [r for r in records if r["sampler"] == sampler and _variant(r) == variant]
        label = method_label(mine[0]) if "guidance" in mine[0] else SAMPLER_LABELS[sampler]
        lines.append(line(label, {r["steps"]: r for r in mine}))
    for top in [ceiling] if isinstance(ceiling, dict) else (ceiling or []):
        lines.append(line(f"*ceiling: {method_label(top, True)}*", {n: top for n in steps}, False))
    if floor_scores:
        label = f"*real images (floor, n = {floor_scores['num_samples']})*"
        lines.append(line(label, {n: floor_scores for n in steps}, False))
    note = ("\nKID×10³ with its 95% sampling interval; Δ: row − baseline on the same prompts and seeds with its "
            "95% paired interval, **bold** where it excludes 0 (positive: the row scores worse).\n"
            if paired else "")
    return "\n".join(lines) + "\n" + note


def best_guidance_markdown(records: list[dict], paired: list[dict] | None = None,
                           baseline: str | None = None) -> str:
    """Each method at each step count at its best guidance (lowest KID) among the swept ones: KID, FID, g; with
    ``paired`` (results["best_guidance"]) the KID difference to the baseline method at its own best g."""
    steps = sorted({r["steps"] for r in records})
    diffs = {(e["key"], e["steps"]): e for e in paired or []} if baseline else {}
    head = ["method", *(f"KID×10³ {n} (g)" for n in steps), *(f"FID {n}" for n in steps)]
    head += [f"Δ KID×10³ {n} vs {baseline} at its best g" for n in steps] if diffs else []
    lines = ["Each method at its best guidance (lowest KID×10³ of the sweep; g in brackets, the LCM's w = g − 1):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = best_guidance(records)
    for sampler, variant in _methods(records):
        mine = {n: best[((sampler, *variant), n)] for n in steps if ((sampler, *variant), n) in best}
        swept = sorted({r["guidance"] for r in records if r["sampler"] == sampler and _variant(r) == variant})
        kid = [f"{scoring.kid_text(mine[n])} ({mine[n]['guidance']:g})" if n in mine else "-" for n in steps]
        fid = [f"{mine[n]['fid']:.2f}" if n in mine else "-" for n in steps]
        delta = [_diff_cell({"key": mine[n]["key"], "paired": diffs[(mine[n]["key"], n)]["paired"]})
                 if n in mine and (mine[n].get("key"), n) in diffs else "-" for n in steps] if diffs else []
        guidances = "g " + ", ".join(f"{g:g}" for g in swept)
        label = f"{SAMPLER_LABELS[sampler]} ({'; '.join([guidances, *_variant_words(variant)])})"
        lines.append("| " + " | ".join([label, *kid, *fid, *delta]) + " |")
    return "\n".join(lines) + "\n"


def intervals_markdown(results: dict, baseline: str | None = None) -> str:
    """Every row's headline metrics with their 95% sampling intervals and, where the row has a baseline row, the
    paired difference row − baseline with its interval (bold where it excludes 0)."""
    settings = results["interval_settings"]
    metrics = (("kid", "KID×10³", 1.0), ("fid", "FID", 1.0), ("caption_score", "score", 1.0),
               ("exact_match", "exact acc. %", 100.0))
    head = ["method", "g", "steps"]
    for _, name, _ in metrics:
        head += [name] + ([f"Δ {name}"] if baseline else [])
    fid_note = (f", FID's the first {settings['fid_resamples']}"
                if settings.get("fid_resamples", settings["num_resamples"]) < settings["num_resamples"] else "")
    lines = [f"Sampling intervals ({settings['confidence']:.0%}, {settings['method']}, {settings['num_resamples']} "
             f"resamples{fid_note})" + (f"; Δ: row − {baseline} at the same step count and g, paired." if baseline else ".")
             + " FID's resamples repeat images, which biases them upwards, so its interval can sit above the value;"
             " KID's leave a row's pairs with its own copies out and are not biased so.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = results["records"] + results.get("sweep", []) + ceilings(results)
    for r in sorted(rows, key=lambda r: (r["steps"], TABLE_SAMPLERS.index(r["sampler"]), str(_variant(r)),
                                         r["guidance"])):
        cells = [method_label(r), f"{r['guidance']:g}", str(r["steps"])]
        for key, _, scale in metrics:
            iv = r["intervals"][key]
            cells.append(_interval(scale * iv["value"], [scale * v for v in iv["ci"]]))
            cells += [_diff_cell(r, key, scale)] if baseline else []
        lines.append("| " + " | ".join(cells) + " |")
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
        for ax, key in zip(axes, ("fid", "caption_score")):
            ax.plot([r[x_key] for r in rs], [r[key] for r in rs], marker="o", label=label(series))
    for (name, scores), style in zip((hlines or {}).items(), ("--", ":", "-.")):
        for ax, key in zip(axes, ("fid", "caption_score")):
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


__all__ = ["SAMPLER_LABELS", "ceilings", "hlines", "method_label", "baseline_label", "results_markdown",
           "table1_markdown", "best_guidance_markdown", "intervals_markdown", "plot_against_steps"]
