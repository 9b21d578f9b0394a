"""Paired distillation fidelity: which of two samplings of an LCM lands nearer its teacher's guided ODE, per g?

    python scripts/paired_fidelity.py A=SAMPLES:PREFIX B=SAMPLES:PREFIX [--steps 4] [--guidances 1.5,2,3,5,8.5]
        [--num-samples 1000] [--resamples 1000] [--out FILE.json]

SAMPLES is a ``lcm ablate guidance`` samples folder and PREFIX the start of an LCM's cached file names there, e.g.
``A=runs/sweep2/samples:lcm-lcm B=runs/sweep2-km/samples:lcm-km-all-lcm`` (the files are
PREFIX-STEPS-gG-nN-s0.npz). The ODE's images at each g (teacher-ddim-trailing-50-gG-nN-s0.npz) are read from A's
folder: both sweeps must share them (the same prompts and seeds). Each LCM's fidelity is the sweep's own: KID x 10^3
of its judge features to the ODE's images of the same prompts and seeds (paired estimator, features scaled by the
ODE images' RMS). B minus A gets a 95% percentile bootstrap interval over prompts, the ODE image of each drawn
prompt drawn with it, A and B on the same resamples; "B nearer" / "A nearer" only where it excludes 0, else
"level". Prints a markdown table; --out writes the rows as JSON.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from latentcm import registry
from latentcm.evaluation import intervals, scoring
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.guidance_sweep import kid_on_resamples

ODE_PREFIX = "teacher-ddim-trailing-50"   # ``lcm ablate guidance``'s ODE row (presets.ode_row)


def parse_source(text: str) -> tuple[str, Path, str]:
    name, _, rest = text.partition("=")
    folder, _, prefix = rest.rpartition(":")
    if not name or not folder or not prefix or not Path(folder).is_dir():
        sys.exit(f"error: a source is NAME=SAMPLES_FOLDER:PREFIX with an existing folder, got {text!r}")
    return name, Path(folder), prefix


def load_images(path: Path) -> np.ndarray:
    if not path.is_file():
        sys.exit(f"error: {path} does not exist (run the sweep first)")
    with np.load(path, allow_pickle=False) as found:
        return found["images"]


def compare_at(g: float, sources: list, steps: int, n: int, extractor, draws) -> dict:
    tag = f"g{g:g}-n{n}-s0.npz"
    ode = scoring.reference_from_images(load_images(sources[0][1] / f"{ODE_PREFIX}-{tag}"), extractor, f"ode-g{g:g}")
    row, boots = {"guidance": g, "steps": steps}, {}
    for name, folder, prefix in sources:
        features = extractor.features(scoring.model_images(load_images(folder / f"{prefix}-{steps}-{tag}")))
        row[name] = round(scoring.distances(features, ode, paired=True)["kid"], 2)
        boots[name] = kid_on_resamples(features, ode, draws, paired=True)  # image i with ODE image i
    (a, b) = [s[0] for s in sources]
    ci = [round(v, 2) for v in intervals.percentile_interval(boots[b] - boots[a])]
    verdict = f"{b} nearer" if ci[1] < 0 else f"{a} nearer" if ci[0] > 0 else "level"
    return {**row, "difference": round(row[b] - row[a], 2), "ci": ci, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs=2, metavar="NAME=SAMPLES:PREFIX")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidances", default="1.5,2,3,5,8.5")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sources = [parse_source(s) for s in args.sources]
    try:
        guidances = [float(g) for g in args.guidances.split(",")]
    except ValueError:
        sys.exit(f"error: --guidances is comma-separated numbers, got {args.guidances!r}")
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    draws = intervals.draw(args.num_samples, args.num_samples, args.resamples, seed=1, reference_follows_prompts=True)
    rows = [compare_at(g, sources, args.steps, args.num_samples, extractor, draws) for g in guidances]
    (a, b) = [s[0] for s in sources]
    print(f"| g | fidelity KID×10³, {a} | {b} | {b} − {a} [95%] | verdict |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r[a]:.1f} | {r[b]:.1f} | {r['difference']:+.1f} [{r['ci'][0]:+.1f}, "
              f"{r['ci'][1]:+.1f}] | {r['verdict']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "num_samples": args.num_samples,
                                              "resamples": args.resamples, "sources": args.sources, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
