"""``lcm ablate``: the paper's ablations (solver x k, Fig. 3; the guidance trade-off, Fig. 4)."""
from __future__ import annotations

from pathlib import Path

import click

from .. import registry
from ..defaults import TEACHER_SOLVERS
from .app import cli
from .evaluation import _judge
from .options import FiniteRange, UserError, _choice_list, _float_list, _int_list, _step_list
from .options import _torch_threads, judge_option, reference_option, seed_option


@cli.group()
def ablate():
    """The paper's ablations: solver x skipping step (Fig. 3) and guidance scale (Fig. 4)."""


def _pair_list(text: str, flag: str) -> list[tuple[str, int]]:
    """SOLVER:K,... -> [(solver, k), ...]; a malformed item, an unknown solver or a k out of range is refused."""
    from ..schedules import TRAIN_TIMESTEPS

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items or any(v.count(":") != 1 for v in items):
        raise UserError(f"{flag}: expected SOLVER:K,... (e.g. ddim:20,dpm-solver:20), got {text!r}")
    return [(_choice_list(v.split(":")[0], TEACHER_SOLVERS, flag)[0],
             _int_list(v.split(":")[1], 1, TRAIN_TIMESTEPS, flag)[0]) for v in items]


def _solver_skip_pairs(solvers_text: str | None, skips_text: str | None,
                       pairs_text: str | None) -> list[tuple[str, int]]:
    """--pairs SOLVER:K,... if given, else every --solvers x --skips pair, else the paper's (``solver_skip.PAIRS``);
    a bad k fails before any run."""
    from ..evaluation.solver_skip import PAIRS
    from ..schedules import TRAIN_TIMESTEPS, training_grid

    if pairs_text is not None and (solvers_text is not None or skips_text is not None):
        raise UserError("pass --pairs, or --solvers / --skips, not both")
    if pairs_text is not None:
        pairs = _pair_list(pairs_text, "--pairs")
    elif solvers_text is None and skips_text is None:
        pairs = list(PAIRS)
    else:
        pairs = [(s, k) for s in _choice_list(solvers_text or ",".join(TEACHER_SOLVERS), TEACHER_SOLVERS, "--solvers")
                 for k in _int_list(skips_text or "1,5,20,50,100", 1, TRAIN_TIMESTEPS, "--skips")]
    for _, k in pairs:
        training_grid(TRAIN_TIMESTEPS, k)  # the teacher's own T is checked again when its run starts
    return list(dict.fromkeys(pairs))


@ablate.command("solver-skip")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", show_default=True, help="Teacher to distil.")
@judge_option("Judge folder.")
@click.option("--pairs", "pairs_text", default=None, metavar="SOLVER:K,...",
              show_default="ddim:1,ddim:5,ddim:20,ddim:50,ddim:100,dpm-solver:20,dpm-solver++:20",
              help="The (solver, k) runs this process trains.")
@click.option("--solvers", "solvers_text", default=None, metavar="S,...",
              help="Instead of --pairs: every --solvers x --skips run (default every solver).")
@click.option("--skips", "skips_text", default=None, metavar="K,...",
              help="Instead of --pairs: the skipping steps k of --solvers (default 1,5,20,50,100).")
@click.option("--iterations", type=click.IntRange(1, 10**6), default=3000, show_default=True,
              help="Length of every run; the cosine lr decays over it.")
@click.option("--until", type=int, default=None, metavar="ITER",
              help="Train every run only up to ITER now (a multiple of --eval-every), then write results from what "
                   "exists; a later call with a larger ITER (or none) continues. Default: --iterations.")
@click.option("--eval-every", type=click.IntRange(1, 10**6), default=500, show_default=True,
              help="Probe (and checkpoint) every N iterations.")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=500, show_default=True,
              help="Held-out prompts (and seeds) per probe; also the teacher ODE samples, made once (100 UNet passes "
                   "each).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--student-ema", type=FiniteRange(0, 1, max_open=True), default=0.999, show_default=True,
              help="Slow EMA of the student, which the probes sample (0: probe the online student).")
@click.option("--num-data", type=click.IntRange(1, 10**6), default=4000, show_default=True,
              help="World images (encoded once, shared).")
@click.option("--baseline", "baseline_text", default="ddim:20", show_default=True, metavar="SOLVER:K",
              help="The run every paired difference and verdict is taken against.")
@click.option("--resamples", type=click.IntRange(1, 10000), default=200, show_default=True,
              help="Bootstrap resamples of the 95% intervals.")
@reference_option("Real images for KID to real (see lcm evaluate --help).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate-solver-skip", show_default=True)
def ablate_solver_skip(teacher, judge_dir, pairs_text, solvers_text, skips_text, iterations, until, eval_every,
                       num_samples, batch_size, student_ema, num_data, baseline_text, resamples, reference, out):
    """LCM Fig. 3: a distillation per (solver, k) with a slow EMA of the student and a cosine lr; every
    --eval-every iterations the EMA's 4-step samples are scored for fidelity to the teacher's guided ODE (paired
    KID and FD, same prompts and seeds) and KID to real. results.md: 95% bootstrap intervals, the paired
    difference of each run to --baseline with a verdict, the run closest to the ODE at the earliest probe;
    results.json, solver-skip.png.

    Interrupted? Rerun the same command: runs resume. Several processes may share one --out with different
    --pairs (same other settings): results cover every run there.

    \b
    Example (all runs to 1000 now, to 3000 in a later session):
      lcm ablate solver-skip --until 1000 --out runs/ablate-solver-skip
      lcm ablate solver-skip --out runs/ablate-solver-skip
    """
    from ..evaluation import solver_skip as S
    from ..evaluation import solver_skip_report

    _torch_threads()
    pairs = _solver_skip_pairs(solvers_text, skips_text, pairs_text)
    baseline = _pair_list(baseline_text, "--baseline")
    if len(baseline) != 1:
        raise UserError(f"--baseline: expected one SOLVER:K, got {baseline_text!r}")
    try:
        S.check_until(until, iterations, eval_every)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    results = S.solver_skip(registry.resolve(teacher), Path(out), pairs, iterations, eval_every, _judge(judge_dir),
                            num_samples, batch_size, num_data, reference=reference, until=until,
                            student_ema=student_ema, baseline=baseline[0], resamples=resamples)
    click.echo(solver_skip_report.markdown(results) + str(Path(out) / "results.json"))


def _sweep_guidances(guidances_text: str | None, omegas_text: str | None) -> list[float]:
    """--guidances G,... (g), or the older --omegas W,... (paper w, g = w + 1); not both."""
    from ..evaluation.guidance_sweep import GUIDANCES

    if guidances_text is not None and omegas_text is not None:
        raise UserError("pass --guidances (g) or --omegas (w = g - 1), not both")
    if omegas_text is not None:
        values = [1.0 + w for w in _float_list(omegas_text, 0, 49, "--omegas")]  # g = 1 + w within 0..50
    else:
        values = _float_list(guidances_text, 0, 50, "--guidances") if guidances_text is not None else list(GUIDANCES)
    if not values:
        raise UserError(f"--guidances must be numbers in 0..50, got {guidances_text or omegas_text!r}")
    return list(dict.fromkeys(values))


def _sweep_bundles(models: tuple[str, ...], teacher: str) -> tuple[dict, list[str]]:
    """({"teacher": ..., name: LCM, ...}, the LCM names): each --model named by its registry name or folder name."""
    from ..bundle import Bundle

    bundles = {"teacher": Bundle.load(registry.resolve(teacher))}
    if bundles["teacher"].is_lcm:
        raise UserError(f"--teacher {bundles['teacher'].path} is an LCM, not a diffusion teacher")
    names = []
    for given in dict.fromkeys(models):
        bundle = Bundle.load(registry.resolve(given))
        if not bundle.is_lcm:
            raise UserError(f"--model {bundle.path} is a diffusion teacher, not an LCM (the teacher's ODE is "
                            "always swept: --teacher)")
        name = Path(given).name or given
        name = name if name not in bundles else f"{name}-{len(names) + 1}"
        bundles[name] = bundle
        names.append(name)
    return bundles, names


@ablate.command("guidance")
@click.option("--model", "models", multiple=True, default=("lcm",), metavar="NAME|DIR", show_default=True,
              help="LCM to sweep (repeatable).")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", show_default=True,
              help="Teacher whose guided ODE (DDIM trailing, 50 steps from t = 999) is swept beside the LCMs and "
                   "is the reference of their distillation fidelity.")
@judge_option("Judge folder.")
@click.option("--guidances", "guidances_text", default=None, metavar="G,G,...", show_default="1,1.5,2,3,5,8.5,12",
              help="Comma-separated guidance scales g (the paper's w = g - 1).")
@click.option("--omegas", "omegas_text", default=None, metavar="W,W,...",
              help="Older spelling: comma-separated paper w (g = w + 1) instead of --guidances.")
@click.option("--steps", "steps_text", default="1,2,4", show_default=True, help="Comma-separated LCM step counts.")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=256, show_default=True,
              help="Held-out prompts (and seeds) per row.")
@click.option("--resamples", type=click.IntRange(0, 10000), default=200, show_default=True,
              help="Bootstrap resamples of the KID intervals (0: none).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@seed_option("Seed of image 0 (image i: seed + i).")
@reference_option("Real images FID/KID compare with (see lcm evaluate --help).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate-guidance")
def ablate_guidance(models, teacher, judge_dir, guidances_text, omegas_text, steps_text, num_samples, resamples,
                    batch_size, seed, reference, out):
    """The guidance trade-off (Fig. 4): the teacher's guided ODE and each LCM at every g and step count, KID to
    real against the judge's attribute accuracy, and each LCM's distillation fidelity (KID and FD of its
    samples against the ODE's at the same g, prompts and seeds): results.json, results.md, tradeoff.png,
    fidelity.png. Samples are cached in OUT/samples: an interrupted sweep resumes.

    \b
    Example:
      lcm ablate guidance --model lcm --steps 1,2,4 --num-samples 256 --out reports/ablate-guidance
    """
    from ..evaluation import ablate as A
    from ..evaluation import guidance_sweep

    _torch_threads()
    guidances = _sweep_guidances(guidances_text, omegas_text)
    steps = _step_list(steps_text, "--steps")
    bundles, names = _sweep_bundles(models, teacher)
    results = A.guidance(bundles, names, _judge(judge_dir), Path(out), guidances, steps, num_samples, batch_size,
                         seed, reference, resamples)
    click.echo(guidance_sweep.markdown(results) + str(Path(out) / "results.json"))
