"""Does a negative prompt keep what it names out of the image? Writes reports/negative-prompt/.

    python scripts/negative_prompt_report.py [--num-samples 256] [--steps 25] [--guidance 7.5]
                                             [--out reports/negative-prompt]
    python scripts/negative_prompt_report.py --model teacher --model DIR [--sampler S] [--steps N] [--guidance G]
                                             [--num-samples 256] [--out DIR]

The prompts leave the object's colour open ("a star on a white background", shapes cycled over white, black and
gray backgrounds), so the model picks a colour itself. Each of NEGATED colours in turn is the negative prompt
(CFG's unconditional text, ``lcm generate --negative-prompt``); the judge reads every image's colour. Per prompt
and seed, the share of the negated colours it shows is averaged over those colours, with and without the
negative, on the same prompts and seeds: the report gives both shares, their paired difference and the relative
drop, each with a 95% percentile-bootstrap interval over prompts (``evaluation.intervals``).

``--model`` (repeatable; default the shipped teacher) names every model measured; ``--sampler``, ``--steps`` and
``--guidance`` are given once (every model) or once per ``--model`` in order; left out, a teacher samples DDIM
COMPARE_TEACHER_STEPS steps at TEACHER_GUIDANCE and an LCM with its own defaults (a real-CFG LCM, ``lcm distill
--guidance-mode cfg``, takes negatives, and so does an LCM with a w input distilled from w = 0, ``--omega-min 0``:
real CFG between its w = 0 predictions; its row without the negative is its usual one-pass sampling at the same g).
A model that refuses a negative prompt (any other LCM with a w input: guided consistency distillation puts the
guidance into that input, there is no unconditional branch to replace) is recorded with its one-line refusal and
not measured. With the default teacher alone the report keeps its first
layout, in which the shipped LCM's refusal is recorded.
"""
import argparse
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
MODES = {"cfg": " (CFG)", "w0": (" (without the negative: its one-pass w input at g; with it: real CFG between its w = 0 "
                                 "predictions, scale g)")}


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


def tables(s: dict, per_colour: dict, caption: str = "") -> str:
    """The summary table (each share with its interval) and the per-colour table, in markdown."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    ci = lambda r, k="ci": f"[{pct(r[k][0])}, {pct(r[k][1])}]"  # noqa: E731
    rows = "\n".join(f"| {c} | {pct(v['without'])} | {pct(v['with'])} |" for c, v in per_colour.items())
    return f"""| | share of images showing the negated colour |
|---|---|
| without the negative prompt | {pct(s['without']['value'])} {ci(s['without'])} |
| with it | {pct(s['with']['value'])} {ci(s['with'])} |
| paired difference | {pct(s['with']['diff'])} {ci(s['with'], 'diff_ci')} |
| relative drop | {pct(s['relative_drop']['value'])} {ci(s['relative_drop'])} |
{chr(10) + caption + chr(10) if caption else ""}
| colour | without | with |
|---|---|---|
{rows}"""


def save_pair_grid(bundle, row: Row, prompts: list[str], samples: Path, path: Path) -> None:
    """The first 8 prompts without (top row) and with "red" as the negative prompt (bottom row)."""
    grid = [generate_cached(bundle, r, prompts, 0, samples)[0][:8] for r in (row, row._replace(negative_prompt="red"))]
    save_grid(from_pixels(np.concatenate(grid)), path, cols=min(8, len(prompts)))


def markdown(results: dict) -> str:
    return f"""# Negative prompts

Command: `{results['command']}`. Teacher: {results['sampler']} {results['steps']} steps, CFG g = {results['guidance']};
{results['num_samples']} colour-open prompts and seeds per condition, each negated colour in turn
({', '.join(NEGATED)}); the judge reads the colour. Intervals: 95% percentile bootstrap over prompts (paired: the
same prompts and seeds with and without the negative).

{tables(results['summary'], results['per_colour'], 'Per colour (without -> with):')}

The shipped LCM is not in this table: it refuses a negative prompt ("{results['lcm']}").

`grid.png`: the first 8 prompts without (top row) and with "red" as the negative prompt (bottom row).
"""


def model_markdown(entry: dict) -> str:
    """One model's section of the several-model report: its settings and tables, or its refusal."""
    if "refused" in entry:
        return f"## {entry['model']}\n\nNot measured: it refuses a negative prompt (\"{entry['refused']}\").\n"
    return f"""## {entry['model']}

`{entry['path']}`: {entry['sampler']} {entry['steps']} steps, g = {entry['guidance']:g}{entry.get('mode', MODES['cfg'])}.

{tables(entry['summary'], entry['per_colour'])}

`grid-{entry['model']}.png`: the first 8 prompts without (top row) and with "red" as the negative prompt (bottom row).
"""


def models_markdown(results: dict) -> str:
    """README.md of a several-model (or non-default) run: a section per model."""
    head = f"""# Negative prompts

Command: `{results['command']}`. {results['num_samples']} colour-open prompts and seeds per condition, each
negated colour in turn ({', '.join(NEGATED)}); the judge reads the colour. Intervals: 95% percentile bootstrap
over prompts (paired: the same prompts and seeds with and without the negative).
"""
    return "\n".join([head, *(model_markdown(e) for e in results["models"])])


def _per_model(values: list | None, count: int, flag: str) -> list:
    """A setting given once (every model), once per --model, or not at all (each model's default: None)."""
    if not values:
        return [None] * count
    if len(values) not in (1, count):
        raise SystemExit(f"negative_prompt_report: {flag} given {len(values)} times for {count} --model; "
                         "give it once or once per --model")
    return values * count if len(values) == 1 else values


def model_row(name: str, bundle, sampler: str | None, steps: int | None, guidance: float | None) -> Row:
    """The model's row without a negative: the given settings, else a teacher's DDIM 25 steps at g 7.5 and an
    LCM's own defaults (``Bundle.defaults``)."""
    own = bundle.defaults if bundle.is_lcm else (TEACHER_SAMPLER, COMPARE_TEACHER_STEPS, TEACHER_GUIDANCE)
    return Row(name, sampler or own[0], steps or own[1], own[2] if guidance is None else guidance)


def measure_model(name: str, path: Path, bundle, extractor, prompts: list[str], row: Row, out: Path) -> dict:
    """One model's entry: its row, shares and summary, and grid-NAME.png; or its refusal (nothing sampled)."""
    try:
        bundle.sampling_options(row._replace(negative_prompt=NEGATED[0]).options)
    except ModelError as err:
        return {"model": name, "path": str(path), "refused": str(err)}
    found = measure(bundle, extractor, prompts, row, out / "samples")
    save_pair_grid(bundle, row, prompts, out / "samples", out / f"grid-{name}.png")
    return {"model": name, "path": str(path), "sampler": row.sampler, "steps": row.steps, "guidance": row.guidance,
            "mode": MODES["w0" if getattr(bundle, "unguided_w0", False) else "cfg"], "num_samples": len(prompts), "per_colour": found["per_colour"], "summary": summarize(found["shares"])}


def main_models(args, extractor, prompts: list[str]) -> None:
    """Every --model (the several-model layout): results.json {"command", ..., "models": [entries]}, README.md."""
    count = len(args.model)
    settings = zip(args.model, _per_model(args.sampler, count, "--sampler"),
                   _per_model(args.steps, count, "--steps"), _per_model(args.guidance, count, "--guidance"))
    entries, flags = [], []
    for given, sampler, steps, guidance in settings:
        path = registry.resolve(given)
        bundle = Bundle.load(path)
        name = Path(given).name or given
        if any(e["model"] == name for e in entries):
            name = f"{name}-{len(entries) + 1}"
        row = model_row(name, bundle, sampler, steps, guidance)
        entries.append(measure_model(name, path, bundle, extractor, prompts, row, args.out))
        flags.append(f"--model {given} --sampler {row.sampler} --steps {row.steps} --guidance {row.guidance:g}")
    judge = "" if args.judge == "judge" else f" --judge {args.judge}"
    command = (f"python scripts/negative_prompt_report.py {' '.join(flags)} --num-samples {args.num_samples}"
               f"{judge} --out {args.out}")
    results = {"command": command, "num_samples": args.num_samples, "negated": list(NEGATED),
               "backgrounds": list(BACKGROUNDS), "models": entries}
    write_json(args.out / "results.json", results)
    write_text(args.out / "README.md", models_markdown(results))
    print((args.out / "README.md").read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--model", action="append", metavar="NAME|DIR",
                    help="model to measure (repeatable) [default: teacher]")
    ap.add_argument("--sampler", action="append", help="once, or once per --model [default: each model's own]")
    ap.add_argument("--steps", type=int, action="append", help=f"once, or once per --model [default: teacher "
                                                               f"{COMPARE_TEACHER_STEPS}, an LCM its own]")
    ap.add_argument("--guidance", type=float, action="append",
                    help=f"once, or once per --model [default: teacher {TEACHER_GUIDANCE}, an LCM its own]")
    ap.add_argument("--judge", default="judge", metavar="NAME|DIR", help="judge folder [default: the shipped one]")
    ap.add_argument("--out", type=Path, default=Path("reports/negative-prompt"))
    args = ap.parse_args(argv)
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    prompts = colour_open_prompts(args.num_samples)
    if args.model not in (None, ["teacher"]) or args.sampler:
        return main_models(args, extractor, prompts)
    steps = _per_model(args.steps, 1, "--steps")[0] or COMPARE_TEACHER_STEPS
    guidance = _per_model(args.guidance, 1, "--guidance")[0]
    teacher_only(args.out, args.num_samples, steps, TEACHER_GUIDANCE if guidance is None else guidance,
                 extractor, prompts)


def teacher_only(out: Path, num_samples: int, steps: int, guidance: float, extractor, prompts: list[str]) -> None:
    """The first layout: the shipped teacher alone, and the shipped LCM's refusal."""
    bundle = Bundle.load(registry.resolve("teacher"))
    base = Row("teacher", TEACHER_SAMPLER, steps, guidance)
    found = measure(bundle, extractor, prompts, base, out / "samples")
    command = (f"python scripts/negative_prompt_report.py --num-samples {num_samples} --steps {steps} "
               f"--guidance {guidance:g} --out {out}")
    results = {"command": command, "sampler": base.sampler, "steps": steps, "guidance": guidance,
               "num_samples": num_samples, "negated": list(NEGATED), "backgrounds": list(BACKGROUNDS),
               "per_colour": found["per_colour"], "summary": summarize(found["shares"]), "lcm": lcm_refusal()}
    write_json(out / "results.json", results)
    write_text(out / "README.md", markdown(results))
    save_pair_grid(bundle, base, prompts, out / "samples", out / "grid.png")
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
