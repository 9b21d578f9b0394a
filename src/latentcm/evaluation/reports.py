"""Reports of results dicts: table1.md (``results_markdown``: Table 1, the ceiling and floor rows, each
method at its best guidance) and the FID / caption-score plots against steps (``plot_against_steps``)."""
from __future__ import annotations

from pathlib import Path

from ..defaults import LCM_SAMPLER, TEACHER_SOLVERS, TRAILING
from ..guidance import omega_from_guidance
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
                                  + [cell(n, lambda r: f"{r['caption_score']:.1f}") for n in steps]
                                  + [cell(n, lambda r: f"{r['exact_match']:.1%}") for n in steps]) + " |")
    for sampler, variant in _methods(records):
        mine = [r for r in records if r["sampler"] == sampler and _variant(r) == variant]
        label = method_label(mine[0]) if "guidance" in mine[0] else SAMPLER_LABELS[sampler]
        lines.append(line(label, {r["steps"]: r for r in mine}))
    for top in [ceiling] if isinstance(ceiling, dict) else (ceiling or []):
        lines.append(line(f"*ceiling: {method_label(top, True)}*", {n: top for n in steps}))
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


__all__ = ["SAMPLER_LABELS", "ceilings", "hlines", "method_label", "results_markdown", "table1_markdown",
           "best_guidance_markdown", "plot_against_steps"]
