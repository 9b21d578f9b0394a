"""Does a negative prompt keep what it names out of the image? Writes reports/negative-prompt/.

    python scripts/negative_prompt_report.py [--num-samples 256] [--steps 25] [--guidance 7.5]
                                             [--out reports/negative-prompt]

The prompts leave the object's colour open ("a star on a white background", shapes cycled over white, black and
gray backgrounds), so the teacher picks a colour itself. Each of NEGATED colours in turn is the negative prompt
(CFG's unconditional text, ``lcm generate --negative-prompt``); the judge reads every image's colour. Per prompt
and seed, the share of the negated colours it shows is averaged over those colours, with and without the
negative, on the same prompts and seeds: the report gives both shares, their paired difference and the relative
drop, each with a 95% percentile-bootstrap interval over prompts (``evaluation.intervals``).

The shipped LCM is not measured: it has no unconditional branch to replace (guided consistency distillation puts
the guidance into its w input), and it refuses a negative prompt in one line, as recorded in results.json.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from latentcm import registry, world
from latentcm.bundle import Bundle
from latentcm.defaults import COMPARE_TEACHER_STEPS, TEACHER_GUIDANCE, TEACHER_SAMPLER
from latentcm.errors import ModelError
from latentcm.evaluation import intervals
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.generation import generate_cached
from latentcm.evaluation.pipeline import Row
from latentcm.evaluation.scoring import judged_values
from latentcm.files import write_json, write_text
from latentcm.images import from_pixels, save_grid

NEGATED = ("red", "green", "blue", "yellow")   # never a background below, so the negative names only the object
BACKGROUNDS = ("white", "black", "gray")


def colour_open_prompts(count: int) -> list[str]:
    """``count`` prompts naming a shape and a background, never a colour: shapes x backgrounds, cycled."""
    pairs = [(s, b) for b in BACKGROUNDS for s in world.ATTRIBUTES["shape"]]
    return [f"a {s} on a {b} background" for s, b in (pairs[i % len(pairs)] for i in range(count))]


def measure(bundle, extractor, prompts: list[str], base: Row, folder: Path) -> dict:
    """Per prompt, the mean over NEGATED of "shows that colour", without and with it as the negative prompt."""
    seen_without = judged_values(generate_cached(bundle, base, prompts, 0, folder)[0], extractor, "colour")
    shares = {"without": np.zeros(len(prompts)), "with": np.zeros(len(prompts))}
    per_colour = {}
    for colour in NEGATED:
        images, _ = generate_cached(bundle, base._replace(negative_prompt=colour), prompts, 0, folder)
        off = (seen_without == colour).astype(np.float64)
        on = (judged_values(images, extractor, "colour") == colour).astype(np.float64)
        per_colour[colour] = {"without": float(off.mean()), "with": float(on.mean())}
        shares["without"] += off / len(NEGATED)
        shares["with"] += on / len(NEGATED)
    return {"shares": shares, "per_colour": per_colour}


def summarize(shares: dict[str, np.ndarray], num_resamples: int = 2000) -> dict:
    """Both shares and their paired difference (with - without), with intervals; the relative drop."""
    draws = intervals.draw(len(shares["with"]), 1, num_resamples=num_resamples, seed=0)
    out = intervals.intervals(shares, None, "mean", draws, baseline="without")
    boot = {k: intervals.mean_resamples(v, None, draws.prompts, draws.reference) for k, v in shares.items()}
    kept = boot["without"] > 0  # a resample with no negated colour at all has no drop to speak of
    drop = 1 - boot["with"][kept] / boot["without"][kept]
    point = 1 - out["with"]["value"] / out["without"]["value"] if out["without"]["value"] > 0 else float("nan")
    return {**out, "relative_drop": {"value": point, "ci": list(intervals.percentile_interval(drop)),
                                     "resamples_without_the_colour": int((~kept).sum())}}


def lcm_refusal() -> str:
    try:
        Bundle.load(registry.resolve("lcm")).sampling_options(negative_prompt="red")
    except ModelError as err:
        return str(err)
    return ""


def markdown(results: dict) -> str:
    s, pct = results["summary"], (lambda v: f"{100 * v:.1f}%")
    ci = lambda r, k="ci": f"[{pct(r[k][0])}, {pct(r[k][1])}]"  # noqa: E731
    rows = "\n".join(f"| {c} | {pct(v['without'])} | {pct(v['with'])} |" for c, v in results["per_colour"].items())
    return f"""# Negative prompts

Command: `{results['command']}`. Teacher: {results['sampler']} {results['steps']} steps, CFG g = {results['guidance']};
{results['num_samples']} colour-open prompts and seeds per condition, each negated colour in turn
({', '.join(NEGATED)}); the judge reads the colour. Intervals: 95% percentile bootstrap over prompts (paired: the
same prompts and seeds with and without the negative).

| | share of images showing the negated colour |
|---|---|
| without the negative prompt | {pct(s['without']['value'])} {ci(s['without'])} |
| with it | {pct(s['with']['value'])} {ci(s['with'])} |
| paired difference | {pct(s['with']['diff'])} {ci(s['with'], 'diff_ci')} |
| relative drop | {pct(s['relative_drop']['value'])} {ci(s['relative_drop'])} |

Per colour (without -> with):

| colour | without | with |
|---|---|---|
{rows}

The shipped LCM is not in this table: it refuses a negative prompt ("{results['lcm']}").

`grid.png`: the first 8 prompts without (top row) and with "red" as the negative prompt (bottom row).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=COMPARE_TEACHER_STEPS)
    ap.add_argument("--guidance", type=float, default=TEACHER_GUIDANCE)
    ap.add_argument("--out", type=Path, default=Path("reports/negative-prompt"))
    args = ap.parse_args()
    bundle = Bundle.load(registry.resolve("teacher"))
    extractor = JudgeExtractor.load(registry.resolve("judge"))
    prompts = colour_open_prompts(args.num_samples)
    base = Row("teacher", TEACHER_SAMPLER, args.steps, args.guidance)
    found = measure(bundle, extractor, prompts, base, args.out / "samples")
    command = (f"python scripts/negative_prompt_report.py --num-samples {args.num_samples} --steps {args.steps} "
               f"--guidance {args.guidance:g} --out {args.out}")
    results = {"command": command, "sampler": base.sampler, "steps": args.steps, "guidance": args.guidance,
               "num_samples": args.num_samples, "negated": list(NEGATED), "backgrounds": list(BACKGROUNDS),
               "per_colour": found["per_colour"], "summary": summarize(found["shares"]), "lcm": lcm_refusal()}
    write_json(args.out / "results.json", results)
    write_text(args.out / "README.md", markdown(results))
    first = prompts[:8]
    grid = [generate_cached(bundle, r, prompts, 0, args.out / "samples")[0][:8]
            for r in (base, base._replace(negative_prompt="red"))]
    save_grid(from_pixels(np.concatenate(grid)), args.out / "grid.png", cols=len(first))
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
