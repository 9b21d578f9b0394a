"""The Fig. 3 ablation's results (``solver_skip``): every run's probes read back from OUT/runs, each probe's
fidelity KID (to the teacher's guided ODE) and KID to real with a 95% percentile bootstrap interval over the
prompts (``intervals``), and the paired difference to a baseline run at the same iteration. Every probe of every
run holds the same prompts and seeds, so one draw of the prompts is applied to all of them; for fidelity the ODE
image of prompt i is drawn with it (``reference_follows_prompts``) and KID leaves out each image's own pair.

Verdicts are generated from the intervals: a run is "lower" or "higher" than the baseline only when the
interval of the paired difference excludes 0 (``intervals.resolved``), else "level".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import write_text
from . import intervals, scoring
from .results import upgrade_keys, write_results

RESAMPLES = 200
FEATURES = "features"
METRICS = ("fidelity_kid", "real_kid")  # interval keys: KID x 10^3 to the ODE's images (paired), to real images


def run_name(solver: str, k: int) -> str:
    return f"{solver}-k{k}"


def parse_run(name: str) -> tuple[str, int]:
    solver, k = name.rsplit("-k", 1)
    return solver, int(k)


def features_path(run_dir: Path, step: int) -> Path:
    """Where a probe keeps its images' judge features (float32 [N, D], .npy)."""
    return Path(run_dir) / FEATURES / f"step-{step:07d}.npy"


def read_probe_log(path: Path) -> list[dict]:
    """Probe records, the last one per iteration (a resumed run may probe an iteration twice); keys of
    older logs renamed (``results.upgrade_keys``)."""
    if not path.is_file():
        return []
    by_iter = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = upgrade_keys(json.loads(line))
            by_iter[r["iteration"]] = r
    return [by_iter[k] for k in sorted(by_iter)]


def collect_runs(out: Path, requested: list[str], settings: dict) -> list[str]:
    """The runs results cover: ``requested`` first, then every other run of OUT/runs with the same settings
    (another process's pairs), by name."""
    found = []
    for d in sorted((Path(out) / "runs").glob("*-k*")):
        path = d / "settings.json"
        if d.name not in requested and path.is_file() and json.loads(path.read_text()) == settings:
            found.append(d.name)
    return list(dict.fromkeys(requested)) + found


def kid_rows(rows: dict[str, np.ndarray], reference: np.ndarray, draws: intervals.Draws,
             paired: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """KID x 10^3 of each row's features to ``reference`` on the full sets (point) and on every resample (boot),
    at the feature scale ``scoring.score`` uses (the reference's RMS)."""
    scale = scoring.kid_scale(reference)
    r = np.asarray(reference, np.float64) / scale
    n, m = len(draws.prompts[0]), len(r)
    full = intervals.kid_reference(r, np.ones((1, m)))
    boot_ref = intervals.kid_reference(r, draws.reference)
    point, boot = {}, {}
    for name, values in rows.items():
        g = np.asarray(values, np.float64) / scale
        point[name] = scoring.KID_SCALE * float(
            intervals.kid_resamples(g, r, np.ones((1, n)), np.ones((1, m)), full, paired=paired)[0])
        boot[name] = scoring.KID_SCALE * intervals.kid_resamples(g, r, draws.prompts, draws.reference, boot_ref,
                                                                 paired=paired)
    return point, boot


def verdict(diff_ci: list[float]) -> str:
    """"lower than baseline" / "higher than baseline" where the paired interval excludes 0, else "level"."""
    if not intervals.resolved(diff_ci):
        return "level (interval includes 0)"
    return "lower than baseline" if diff_ci[1] < 0 else "higher than baseline"


def _entry(point, boot, name: str, baseline: str) -> dict:
    """{"value", "ci"} of one run, with the baseline at this iteration {"diff", "diff_ci", "verdict"}; only the
    value where every resample is undefined (a handful of prompts)."""
    out = {"value": round(point[name], 4)}
    try:
        out["ci"] = [round(v, 4) for v in intervals.percentile_interval(boot[name])]
        if baseline in point:
            d = intervals.paired(point, boot, name, baseline)
            out.update(diff=round(d["diff"], 4), diff_ci=[round(v, 4) for v in d["diff_ci"]],
                       verdict="baseline" if name == baseline else verdict(d["diff_ci"]))
    except ValueError:
        pass
    return out


def _fastest(point, boot, iteration: int) -> dict | None:
    """The run closest to the ODE (lowest fidelity KID) and every other run's paired difference to it (run - best)
    with its interval; None where every resample is undefined."""
    best, others = min(point, key=point.get), []
    try:
        for name in point:
            if name != best:
                d = intervals.paired(point, boot, name, best)
                others.append({"run": name, "diff": round(d["diff"], 4), "diff_ci": [round(v, 4) for v in d["diff_ci"]],
                               "resolved": intervals.resolved(d["diff_ci"])})
    except ValueError:
        return None
    return {"iteration": iteration, "run": best, "value": round(point[best], 4), "others": others}


def _load(out: Path, names: list[str]) -> dict[str, dict[int, dict]]:
    """run -> iteration -> probe record (with "features" when the probe kept them)."""
    runs = {}
    for name in names:
        run_dir = Path(out) / "runs" / name
        runs[name] = {}
        for r in read_probe_log(run_dir / "probe.jsonl"):
            path = features_path(run_dir, r["iteration"])
            features = np.load(path, allow_pickle=False) if path.is_file() else None  # older logs kept none
            runs[name][r["iteration"]] = {**r, "features": features}
    return runs


def _analyse(runs: dict, ref, ode_ref, baseline: str, resamples: int, seed: int) -> dict | None:
    """Intervals per (run, iteration) into runs[name][it]["intervals"]; the earliest probe after 0 that every run
    holds: its closest run to the ODE and every other run's paired difference to it (None without one)."""
    n = len(ode_ref.features)
    draws = {"fidelity_kid": intervals.draw(n, n, resamples, seed=seed + 1, reference_follows_prompts=True),
             "real_kid": intervals.draw(n, len(ref.features), resamples, seed=seed)}
    refs = {"fidelity_kid": (ode_ref.features, True), "real_kid": (ref.features, False)}
    iterations = sorted({i for r in runs.values() for i in r})
    shared = [i for i in iterations if i > 0 and all(runs[name].get(i, {}).get("features") is not None
                                                     for name in runs)]
    fastest = None
    for it in iterations:
        rows = {name: r[it]["features"] for name, r in runs.items() if r.get(it, {}).get("features") is not None}
        if not rows:
            continue
        for metric in METRICS:
            point, boot = kid_rows(rows, refs[metric][0], draws[metric], paired=refs[metric][1])
            for name in rows:
                runs[name][it].setdefault("intervals", {})[metric] = _entry(point, boot, name, baseline)
            if metric == "fidelity_kid" and shared and it == shared[0] and len(rows) > 1:
                fastest = _fastest(point, boot, it)
    return fastest


def build(out: Path, requested: list[str], settings: dict, ref, ode_ref, baseline: str,
          resamples: int = RESAMPLES) -> dict:
    """The results dict of every run ``collect_runs`` finds: flat "records" (solver, skip, iteration, the probe's
    scores, "intervals"), "verdicts" (each run against ``baseline`` at the last iteration both hold) and "fastest"
    (the closest run to the ODE at the earliest shared probe, with every other run's paired difference to it)."""
    names = collect_runs(out, requested, settings)
    runs = _load(out, names)
    fastest = _analyse(runs, ref, ode_ref, baseline, resamples, settings.get("seed", 0))
    records = []
    for name in names:
        solver, k = parse_run(name)
        records += [{"solver": solver, "skip": k, "run": name, **{key: v for key, v in r.items() if key != "features"}}
                    for r in runs[name].values()]
    return {**settings, "runs": names, "baseline": baseline, "resamples": resamples,
            "records": records, "verdicts": verdicts(records, baseline), "fastest": fastest}


def verdicts(records: list[dict], baseline: str) -> list[dict]:
    """Per run other than the baseline: its fidelity verdict at the last iteration it shares with the baseline."""
    out = []
    for name in dict.fromkeys(r["run"] for r in records):
        have = [r for r in records if r["run"] == name and "diff_ci" in r.get("intervals", {}).get("fidelity_kid", {})]
        if name != baseline and have:
            last = have[-1]
            f = last["intervals"]["fidelity_kid"]
            out.append({"run": name, "iteration": last["iteration"], "diff": f["diff"], "diff_ci": f["diff_ci"],
                        "verdict": f["verdict"]})
    return out


def _ci(entry: dict | None, key: str = "value", ci: str = "ci") -> str:
    if not entry or key not in entry:
        return "-"
    if ci not in entry:
        return f"{entry[key]:.2f}"
    lo, hi = entry[ci]
    sign = "+" if key == "diff" else ""
    return f"{entry[key]:{sign}.2f} [{lo:{sign}.2f}, {hi:{sign}.2f}]"


def _iteration_table(results: dict, it: int) -> list[str]:
    base = results["baseline"]
    lines = [f"| run | fidelity KID×10³ [95%] | Δ to {base} [95%] | FD to ODE | KID×10³ to real [95%] | "
             f"Δ to {base} [95%] | fidelity verdict |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in results["records"] if r["iteration"] == it):
        iv = r.get("intervals", {})
        fid, real = iv.get("fidelity_kid"), iv.get("real_kid")
        fd = f"{r['fidelity']['fid']:.1f}" if "fidelity" in r else "-"
        lines.append(f"| {r['run']} | {_ci(fid)} | {_ci(fid, 'diff', 'diff_ci')} | {fd} | {_ci(real)} | "
                     f"{_ci(real, 'diff', 'diff_ci')} | {(fid or {}).get('verdict', '-')} |")
    return lines


def _curve_table(results: dict, metric: str, title: str) -> list[str]:
    iters = sorted({r["iteration"] for r in results["records"]})
    lines = ["| run | " + " | ".join(f"{title} @{i}" for i in iters) + " |", "|" + "---|" * (1 + len(iters))]
    for name in results["runs"]:
        by = {r["iteration"]: r.get("intervals", {}).get(metric) for r in results["records"] if r["run"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{by[i]['value']:.2f}" if by.get(i) else "-" for i in iters) + " |")
    return lines


def _fastest_lines(fastest: dict | None) -> list[str]:
    if not fastest:
        return ["No probe after iteration 0 is shared by every run yet."]
    lower = [o["run"] for o in fastest["others"] if o["resolved"] and o["diff_ci"][0] > 0]
    level = [o["run"] for o in fastest["others"] if not o["resolved"]]
    lines = [f"At iteration {fastest['iteration']} (the earliest probe every run holds) the closest to the ODE is "
             f"**{fastest['run']}** (fidelity KID×10³ {fastest['value']:.2f}); it is resolved lower than: "
             f"{', '.join(lower) or 'none'}; level with (interval includes 0): {', '.join(level) or 'none'}."]
    lines += ["", "| run | Δ fidelity KID×10³ to it [95%] |", "|---|---|"]
    lines += [f"| {o['run']} | {_ci(o, 'diff', 'diff_ci')} |" for o in fastest["others"]]
    return lines


def _shown_iterations(results: dict) -> list[int]:
    """The iterations whose tables results.md shows: the last and the earliest after 0 that every run holds (the
    verdicts' and the fastest run's), and the last probe of all when it is later."""
    iters = sorted({r["iteration"] for r in results["records"]})
    held = {name: {r["iteration"] for r in results["records"] if r["run"] == name} for name in results["runs"]}
    shared = [i for i in iters if i > 0 and all(i in h for h in held.values())]
    return list(dict.fromkeys(([iters[-1]] if iters else []) + shared[-1:] + shared[:1]))


def markdown(results: dict) -> str:
    """Verdicts, the fastest run, tables at the probes ``_shown_iterations`` picks, and both curves."""
    probe, ode = results.get("probe", {}), results.get("probe", {}).get("teacher_ode", {})
    lines = ["# LCM Fig. 3 on the shapes world: ODE solver × skipping step k", "",
             f"LCD runs of {results['iterations']} iterations (this call trained up to {results.get('until', '?')}), "
             f"batch {results['batch_size']}, cosine lr {results['lr']:g} → ×{results['min_lr_ratio']}, slow EMA "
             f"{results['student_ema']} of the student (probed). Every {results['eval_every']} iterations: "
             f"{probe.get('steps', '?')}-step samples at w = {probe.get('omega', '?')} for {results['num_samples']} "
             f"held-out prompts. **Fidelity** = KID×10³ (paired) of these samples to the teacher's guided ODE "
             f"({ode.get('sampler', '?')}, {ode.get('steps', '?')} steps) at the same w, prompts and seeds: "
             "lower = closer. "
             f"95% percentile bootstrap over prompts ({results['resamples']} resamples); Δ = run − "
             f"{results['baseline']} on the same resamples.", "",
             f"## Verdicts: fidelity against {results['baseline']} at the last shared probe", ""]
    lines += [f"- {v['run']} @{v['iteration']}: {v['verdict']}: Δ {_ci(v, 'diff', 'diff_ci')}"
              for v in results["verdicts"]] or ["- no run shares a probe with the baseline yet"]
    lines += ["", "## Which run converges fastest", "", *_fastest_lines(results.get("fastest"))]
    shown = _shown_iterations(results)
    for it in shown:
        lines += ["", f"## Iteration {it}", "", *_iteration_table(results, it)]
    lines += ["", "## Fidelity KID×10³ over iterations", "", *_curve_table(results, "fidelity_kid", "fid. KID"),
              "", "## KID×10³ to real over iterations", "", *_curve_table(results, "real_kid", "KID")]
    for label, key in (("the teacher's guided ODE itself (the target)", "teacher_ode"),
                       ("real images (floor)", "floor")):
        if results.get(key):
            lines.append(f"\nKID×10³ to real of {label}: {results[key]['kid']:.2f}, FID {results[key]['fid']:.1f}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Fidelity KID against iteration per run with its 95% interval (left), KID to real (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in zip(axes, METRICS, ("fidelity: KID×10³ to the teacher's guided ODE",
                                                 "KID×10³ to real images")):
        for j, name in enumerate(results["runs"]):
            dodge = results["eval_every"] * 0.03 * (j - (len(results["runs"]) - 1) / 2)  # error bars side by side
            rs = [r for r in results["records"] if r["run"] == name and metric in r.get("intervals", {})]
            if not rs:
                continue
            v = np.array([r["intervals"][metric]["value"] for r in rs])
            ci = np.array([r["intervals"][metric].get("ci", [r["intervals"][metric]["value"]] * 2) for r in rs])
            ax.errorbar([r["iteration"] + dodge for r in rs], v, yerr=[v - ci[:, 0], ci[:, 1] - v], marker="o", capsize=3,
                        label=name)
        if metric == "real_kid" and results.get("teacher_ode"):
            ax.axhline(results["teacher_ode"]["kid"], color="black", ls=":", lw=1, label="teacher ODE")
        else:  # fidelity falls by two orders of magnitude in the first probes: a log scale keeps the later ones apart
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration (95% bootstrap intervals)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write(out: Path, results: dict) -> None:
    """results.json, results.md and solver-skip.png into ``out``."""
    write_results(Path(out) / "results.json", results)
    write_text(Path(out) / "results.md", markdown(results))
    plot(results, Path(out) / "solver-skip.png")


__all__ = ["build", "markdown", "plot", "write", "verdict", "verdicts", "kid_rows", "collect_runs", "read_probe_log",
           "features_path", "run_name", "parse_run", "RESAMPLES"]
