"""``lcm ablate``: the paper's ablations (solver x k, Fig. 3; the guidance trade-off, Fig. 4)."""
from __future__ import annotations

from pathlib import Path

import click

from .. import registry
from ..defaults import TEACHER_SOLVERS
from .app import cli
from .evaluation import _judge
from .options import UserError, _choice_list, _float_list, _int_list, _step_list
from .options import _torch_threads, judge_option, reference_option, seed_option


@cli.group()
def ablate():
    """The paper's ablations: solver x skipping step (Fig. 3) and guidance scale (Fig. 4)."""


def _solver_skip_pairs(solvers_text: str, skips_text: str, pairs_text: str | None) -> list[tuple[str, int]]:
    """--pairs SOLVER:K,... if given, else every --solvers x --skips pair; a bad k fails before any run."""
    from ..schedules import TRAIN_TIMESTEPS, training_grid

    if pairs_text is None:
        pairs = [(s, k) for s in _choice_list(solvers_text, TEACHER_SOLVERS, "--solvers")
                 for k in _int_list(skips_text, 1, TRAIN_TIMESTEPS, "--skips")]
    else:
        items = [v.strip() for v in pairs_text.split(",") if v.strip()]
        if not items or any(v.count(":") != 1 for v in items):
            raise UserError(f"--pairs: expected SOLVER:K,... (e.g. ddim:20,dpm-solver:20), got {pairs_text!r}")
        pairs = [(_choice_list(v.split(":")[0], TEACHER_SOLVERS, "--pairs")[0],
                  _int_list(v.split(":")[1], 1, TRAIN_TIMESTEPS, "--pairs")[0]) for v in items]
    for _, k in pairs:
        training_grid(TRAIN_TIMESTEPS, k)  # the teacher's own T is checked again when its run starts
    return list(dict.fromkeys(pairs))


@ablate.command("solver-skip")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Teacher to distil.")
@judge_option("Judge folder.")
@click.option("--solvers", "solvers_text", default=",".join(TEACHER_SOLVERS), help="Comma-separated.")
@click.option("--skips", "skips_text", default="1,5,10,20,50", help="Comma-separated skipping steps k.")
@click.option("--pairs", "pairs_text", default=None, metavar="SOLVER:K,...",
              help="Run these (solver, k) pairs instead of every --solvers x --skips combination.")
@click.option("--iterations", type=click.IntRange(1, 10**6), default=1500, help="Distillation steps per run.")
@click.option("--eval-every", type=click.IntRange(1, 10**6), default=500, help="Probe 4-step KID/FID every N steps.")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=1000,
              help="Held-out prompts per probe (at 128 a perfect generator's FID is about 370; KID is unbiased).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16)
@click.option("--num-data", type=click.IntRange(1, 10**6), default=4000, help="World images (encoded once, shared).")
@reference_option("Real images FID/KID compare with (see lcm evaluate --help).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate-solver-skip")
def ablate_solver_skip(teacher, judge_dir, solvers_text, skips_text, pairs_text, iterations, eval_every,
                       num_samples, batch_size, num_data, reference, out):
    """Short distillations per (solver, k), 4-step KID and FID over iterations: results.json, results.md,
    solver-skip.png. Interrupted? Rerun the same command: finished runs are kept, the others resume.

    \b
    Example:
      lcm ablate solver-skip --solvers ddim --skips 1,20 --batch-size 8 --reference independent
    """
    from ..evaluation import ablate as A

    _torch_threads()
    pairs = _solver_skip_pairs(solvers_text, skips_text, pairs_text)
    results = A.solver_skip(registry.resolve(teacher), Path(out), pairs, iterations, eval_every, _judge(judge_dir),
                            num_samples, batch_size, num_data, reference=reference)
    click.echo(A.solver_skip_markdown(results["records"], results["floor"]) + str(Path(out) / "results.json"))


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
