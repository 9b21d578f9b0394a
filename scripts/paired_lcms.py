"""Paired comparison of LCMs on the same prompts and seeds: is a candidate better, worse or level with a baseline?

    python scripts/paired_lcms.py BASE=MODEL CAND=MODEL [...] --rows STEPS:NAME@G,NAME@G,... [--rows ...]
                                 [--negative NAME=TEXT ...] [--renoise NAME=MODE ...] [--num-samples 1000]
                                 [--out FILE.json]

Each --rows names one step count and, per model, the guidance scale g it is sampled at there (e.g. each model's
best g from ``lcm ablate guidance``). The prompts and seeds are ``lcm ablate guidance``'s (held-out captions,
image i from seed i; its samples are cached under --cache), every row is scored by ``scoring.score`` against the
prompt-scenes reference, and within each step count every model's KID x 10^3 is compared with the FIRST model
named: a paired 95% percentile bootstrap interval of the difference, prompts resampled together for every row and
the reference resampled with them (``evaluation.intervals``). "better" / "worse" only where the interval
excludes 0, else "level". Judge accuracies (colour, background, shape) get the same paired intervals.
``--negative NAME=TEXT`` samples that model with a negative prompt (an LCM that takes one; TEXT may be empty:
``NAME=`` is real CFG against the empty prompt, the quality of the negative-prompt mode itself). A model may be
named twice (``a=DIR b=DIR --negative b=``) to compare its two modes. ``--renoise NAME=keep-means`` samples that
model with keep-means re-noising (``lcm generate --renoise``); ``a=DIR b=DIR --renoise b=keep-means`` compares the two
samplers on one model.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.defaults import LCM_SAMPLER
from latentcm.evaluation import intervals, references, scoring
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.pipeline import Row, generate_and_score

ATTRIBUTES = ("colour", "background", "shape")


def parse_rows(text: str, names: list[str]) -> tuple[int, dict[str, float]]:
    try:
        steps, rest = text.split(":", 1)
        found = {name: float(g) for name, g in (item.split("@") for item in rest.split(","))}
        steps = int(steps)
    except ValueError:
        sys.exit(f"error: --rows is STEPS:NAME@G,NAME@G,..., got {text!r}")
    if sorted(found) != sorted(names):
        sys.exit(f"error: --rows {text!r} must give a g for each of {', '.join(names)}")
    return steps, found


def verdict(ci: list[float], lower_is_better: bool) -> str:
    if ci[0] <= 0 <= ci[1]:
        return "level"
    return "better" if (ci[1] < 0) == lower_is_better else "worse"


def compare(bundles: dict, names: list[str], steps: int, gs: dict, prompts, extractor, ref, draws, cache: Path,
            negatives: dict, renoise: dict):
    features, accuracy, out = {}, {}, {"steps": steps, "guidance": gs, "rows": {}}
    for name in names:
        row = Row(name, LCM_SAMPLER, steps, gs[name], negative_prompt=negatives.get(name), renoise=renoise.get(name))
        scores, _, _ = generate_and_score(bundles[name], row, prompts, extractor, ref, cache, per_image=True)
        per = scores.pop("per_image")
        features[name], accuracy[name] = per["features"], per["attribute_accuracy"]
    scale = scoring.kid_scale(ref.features)  # as scoring.score scales the features
    kid = intervals.intervals({k: v.astype(np.float64) / scale for k, v in features.items()},
                              ref.features.astype(np.float64) / scale, "kid", draws, baseline=names[0])
    k = scoring.KID_SCALE
    for name in names:
        row = {"kid": k * kid[name]["value"], "kid_ci": [k * v for v in kid[name]["ci"]],
               "kid_diff": k * kid[name]["diff"], "kid_diff_ci": [k * v for v in kid[name]["diff_ci"]]}
        row["kid_verdict"] = "baseline" if name == names[0] else verdict(row["kid_diff_ci"], lower_is_better=True)
        for a in ATTRIBUTES:
            keep = ~np.isnan(accuracy[names[0]][a]) & ~np.isnan(accuracy[name][a])
            d = 100 * (accuracy[name][a][keep] - accuracy[names[0]][a][keep])
            boot = (draws.prompts[:, keep] * d).sum(axis=1) / draws.prompts[:, keep].sum(axis=1)
            row[a] = 100 * float(np.nanmean(accuracy[name][a]))
            row[f"{a}_diff"], row[f"{a}_diff_ci"] = float(d.mean()), list(intervals.percentile_interval(boot))
        out["rows"][name] = row
    return out


def markdown(results: list[dict], names: list[str], n: int) -> str:
    lines = [f"| steps | model (g) | KID×10³ [95%] | Δ KID vs {names[0]} [95%] | verdict | Δ colour | Δ background "
             f"| Δ shape |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, row in r["rows"].items():
            acc = " | ".join(f"{row[f'{a}_diff']:+.1f} [{row[f'{a}_diff_ci'][0]:+.1f}, {row[f'{a}_diff_ci'][1]:+.1f}]"
                             for a in ATTRIBUTES)
            lines.append(f"| {r['steps']} | {name} ({r['guidance'][name]:g}) | {row['kid']:.1f} "
                         f"[{row['kid_ci'][0]:.1f}, {row['kid_ci'][1]:.1f}] | {row['kid_diff']:+.1f} "
                         f"[{row['kid_diff_ci'][0]:+.1f}, {row['kid_diff_ci'][1]:+.1f}] | {row['kid_verdict']} | {acc} |")
    return f"n = {n} prompts and seeds per row (paired)\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL")
    ap.add_argument("--rows", action="append", required=True)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--negative", action="append", default=[], metavar="NAME=TEXT")
    ap.add_argument("--renoise", action="append", default=[], metavar="NAME=MODE")
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--cache", default="runs/paired-lcms", help="folder the samples are cached in")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(p) != 2 for p in pairs):
        sys.exit("error: each model is NAME=MODEL (a shipped name or a folder)")
    names = [name for name, _ in pairs]
    bundles = {name: Bundle.load(registry.resolve(model)) for name, model in pairs}
    rows = [parse_rows(text, names) for text in args.rows]
    negatives = dict(item.split("=", 1) for item in args.negative if "=" in item)
    if len(negatives) != len(args.negative) or not set(negatives) <= set(names):
        sys.exit(f"error: each --negative is NAME=TEXT with NAME one of {', '.join(names)}")
    renoise = dict(item.split("=", 1) for item in args.renoise if "=" in item)
    if len(renoise) != len(args.renoise) or not set(renoise) <= set(names):
        sys.exit(f"error: each --renoise is NAME=MODE with NAME one of {', '.join(names)}")
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    ref = references.reference_set(extractor, "prompt-scenes")
    prompts = [p for p, _ in references.heldout_prompts(args.num_samples)]
    draws = intervals.draw(args.num_samples, len(ref.features), args.resamples, seed=0)
    results = [compare(bundles, names, steps, gs, prompts, extractor, ref, draws, Path(args.cache), negatives, renoise)
               for steps, gs in rows]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"num_samples": args.num_samples, "models": dict(pairs),
                                              "negatives": negatives, "renoise": renoise,
                                              "reference": ref.name, "results": results}, indent=1))
    print(markdown(results, names, args.num_samples))


if __name__ == "__main__":
    main()
