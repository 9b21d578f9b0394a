"""The ``lcm`` command line: a thin shell over importable functions.

Bad input ends with one line on stderr (``lcm: error: ...``) and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import offline  # noqa: F401
from . import registry

from .defaults import LCM_GUIDANCE, LCM_SAMPLER, LCM_STEPS, LORA_OMEGA, OMEGA_RANGE, SKIP, TEACHER_GUIDANCE
from .defaults import TEACHER_SAMPLERS as SAMPLER_CHOICES
from .defaults import TEACHER_SOLVERS as SOLVER_CHOICES
from .defaults import TEACHER_STEPS, TIMESTEP_SCHEDULES, TRAILING

GENERATE_SAMPLERS = (*SAMPLER_CHOICES, LCM_SAMPLER)


class UserError(click.ClickException):
    exit_code = 2


class FiniteRange(click.FloatRange):
    """A float option in a range that also refuses NaN and +-inf (NaN passes every comparison)."""

    name = "float range"

    def convert(self, value, param, ctx):
        import math

        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def default_model() -> str:
    """The shipped LCM when this installation has one, else the shipped teacher."""
    return "lcm" if "lcm" in registry.shipped_models() else "teacher"


def _torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="latentcm")
def cli() -> None:
    """latentcm: Latent Consistency Models on Stable-Diffusion-family models, offline."""


@cli.command()
@click.argument("prompt")
@click.option("--model", default=default_model, show_default="lcm if shipped, else teacher", metavar="NAME|DIR",
              help="Shipped model name or diffusers folder (teacher or LCM).")
@click.option("--sampler", type=click.Choice(GENERATE_SAMPLERS), default=None,
              show_default="lcm for an LCM, ddim for a teacher", help="lcm for an LCM folder, else a teacher sampler.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, show_default=f"{LCM_STEPS} for an LCM, {TEACHER_STEPS} for a teacher",
              help="Sampling steps (LCM: 1-8 usual, at most its original_inference_steps).")
@click.option("--guidance", type=FiniteRange(0, 50), default=None,
              show_default=f"{LCM_GUIDANCE} for an LCM, {TEACHER_GUIDANCE} for a teacher",
              help="Guidance scale g (1 = none); an LCM is conditioned on w = g - 1.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, help="Seed of the first image.")
@click.option("--num-images", type=click.IntRange(1, 256), default=8, help="Images in the grid.")
@click.option("--height", type=click.IntRange(8, 1024), default=None, help="Image height (default: model's).")
@click.option("--width", type=click.IntRange(8, 1024), default=None, help="Image width (default: model's).")
@click.option("--out", type=click.Path(dir_okay=False), default="samples/grid.png", help="Output PNG.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:WEIGHT]",
              help="LCM-LoRA (folder or .safetensors) on a teacher --model; repeat to stack, weight default 1.")
@click.option("--init-image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="img2img: start from this image, fitted to the output size (LCM or --lora only).")
@click.option("--strength", type=FiniteRange(0, 1, min_open=True), default=None,
              show_default="0.5 with --init-image", help="img2img: how much of the image to redo (1 = all).")
@click.option("--gamma", type=FiniteRange(0, 1), default=None, show_default="off: LCM sampling",
              help="TCD sampling with stochasticity gamma (0 = deterministic), as diffusers' TCDScheduler; LCM only.")
@click.option("--guidance-max-t", type=click.IntRange(0, 10**6), default=None, metavar="T",
              help="Teacher samplers: guidance only at the steps with t <= T, none above (a guidance interval).")
@click.option("--timesteps", "timesteps_text", default=None, metavar="T,T,...",
              help="LCM: this descending schedule instead of --steps points of the grid, e.g. 999,499,299,99.")
@click.option("--schedule", type=click.Choice(TIMESTEP_SCHEDULES), default=None, show_default="the model's",
              help="LCM: how --steps timesteps are picked: grid (diffusers' LCMScheduler) or refine (after the "
                   "first step, every step at low noise); the shipped LCM's sampling.json asks for refine.")
def generate(prompt, model, sampler, steps, guidance, seed, num_images, height, width, out, loras, init_image,
             strength, gamma, guidance_max_t, timesteps_text, schedule):
    """Generate an image grid from a text prompt.

    Image i uses seed SEED+i, so an image does not depend on --num-images. An LCM
    folder samples with --sampler lcm (one UNet pass per step), a teacher with CFG.

    \b
    Examples:
      lcm generate "a large red circle on a blue background" --out red.png
      lcm generate "a large red circle on a blue background" --model teacher --steps 50 --out red50.png
      lcm generate "a large red circle on a blue background" --model teacher --lora runs/lcm-lora --out lora.png
      lcm generate "a large red circle on a green background" --init-image red.png --strength 0.5 --out i2i.png
    """
    from .bundle import Bundle
    from .models.lora import parse_lora_spec
    from .defaults import IMG2IMG_STRENGTH
    from .images import save_grid

    if not prompt.strip():
        raise UserError("the prompt is empty; describe the image, e.g. \"a red circle on a blue background\"")
    if strength is not None and init_image is None:
        raise UserError("--strength needs --init-image (img2img)")
    if loras and guidance is not None:
        raise UserError("an LCM-LoRA has its guidance distilled in (no w embedding); leave out --guidance")
    if guidance_max_t is not None and (init_image is not None or loras):
        raise UserError("--guidance-max-t is for a teacher's CFG samplers, not img2img or an LCM-LoRA")
    timesteps = _int_list(timesteps_text, 0, 999999, "--timesteps") if timesteps_text else None
    if (timesteps is not None or schedule is not None) and init_image is not None:
        raise UserError("--timesteps and --schedule are for text-to-image; img2img picks its timesteps from --strength")
    if timesteps is not None and schedule is not None:
        raise UserError("pass --timesteps or --schedule, not both")
    bundle = Bundle.load(registry.resolve(model), loras=[parse_lora_spec(spec) for spec in loras])
    prompts, seeds = [prompt] * num_images, [seed + i for i in range(num_images)]
    if init_image is not None:
        strength = IMG2IMG_STRENGTH if strength is None else strength
        images = bundle.img2img(prompts, seeds, init_image, strength, sampler, steps, guidance, height, width,
                                gamma=gamma)
    else:
        try:
            images = bundle.generate(prompts, seeds, sampler, steps, guidance, height, width, gamma=gamma,
                                     guidance_max_t=guidance_max_t, timesteps=timesteps, schedule=schedule)
        except ValueError as err:  # a schedule validate_timesteps refuses
            if timesteps is None:
                raise
            raise UserError(f"--timesteps: {err}") from None
    path = save_grid(images, Path(out), cols=min(8, num_images))
    click.echo(str(path))


def _load_pair(lcm_model: str, teacher: str) -> tuple[dict, dict]:
    """({"lcm": folder, "teacher": folder}, the loaded Bundles); UserError when the kinds are swapped."""
    from .bundle import Bundle

    dirs = {"lcm": registry.resolve(lcm_model), "teacher": registry.resolve(teacher)}
    bundles = {name: Bundle.load(folder) for name, folder in dirs.items()}
    for name, bundle in bundles.items():
        if bundle.is_lcm != (name == "lcm"):
            kind = "an LCM" if bundle.is_lcm else "a diffusion teacher"
            raise UserError(f"--{name} {dirs[name]} is {kind}; swap --lcm and --teacher?")
    return dirs, bundles


@cli.command()
@click.argument("prompt")
@click.option("--lcm", "lcm_model", default="lcm", metavar="NAME|DIR", help="Shipped LCM name or LCM folder.")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Shipped teacher name or teacher folder.")
@click.option("--num-images", type=click.IntRange(1, 64), default=4, help="Images per row (seeds SEED..SEED+K-1).")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, help="Seed of the first image.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples/compare.png", help="Output PNG.")
def compare(prompt, lcm_model, teacher, num_images, seed, out):
    """One PNG with labelled rows: LCM 1, 2, 4 steps and the teacher's DDIM 25 steps (CFG), same seeds.

    Prints the PNG's path, then one line per row with its measured seconds per image.

    \b
    Example:
      lcm compare "a small green triangle on a white background" --out compare.png
    """
    from .evaluation.compare import compare as compare_rows

    if not prompt.strip():
        raise UserError("the prompt is empty; describe the image, e.g. \"a red circle on a blue background\"")
    _, bundles = _load_pair(lcm_model, teacher)
    path, timings = compare_rows(bundles, prompt, out, num_images, seed)
    click.echo(str(path))
    for row, sec in timings:
        click.echo(f"{row.label.replace(chr(10), ' ')}: {sec:.3f} s/image")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object name -> folder.")
def models(as_json):
    """List the shipped models and their folders."""
    found = registry.shipped_models()
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        for name, path in found.items():
            click.echo(f"{name}\t{path}")


@cli.command("train-teacher")
@click.argument("stage", type=click.Choice(["vae", "clip", "judge", "unet", "all", "export"]))
@click.option("--out", type=click.Path(file_okay=False), default="runs/build", help="Build folder.")
@click.option("--preset", type=click.Choice(["default", "micro"]), default="default", help="Component sizes.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, help="Initialisation/batch seed.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint; skip finished stages.")
@click.option("--steps", "--max-steps", "steps", type=click.IntRange(1, 10**7), default=None,
              help="Override the stage's step count.")
@click.option("--max-minutes", type=FiniteRange(0.1, None), default=None,
              help="Stop cleanly (with a checkpoint) after this long in all; continue later with --resume.")
def train_teacher(stage, out, preset, seed, resume, steps, max_minutes):
    """Build the offline default teacher from scratch: VAE, tiny CLIP, judge, UNet.

    Stages run in that order; `all` runs every unfinished one, `export` assembles the
    diffusers folder OUT/teacher. Interrupted? Rerun the same command with --resume.

    \b
    Example (about 1.5 hours on 2 CPU cores):
      nohup lcm train-teacher all --out runs/build > build.log 2>&1 &
      lcm train-teacher all --out runs/build --resume     # after an interruption
      lcm train-teacher export --out runs/build
    """
    from .teacher_build import stages as build

    _torch_threads()
    out_dir = Path(out)
    if stage == "export":
        click.echo(str(build.export_teacher(out_dir)))
        return
    stages = list(build.STAGES) if stage == "all" else [stage]
    finished = build.run_stages(out_dir, stages, preset, seed, resume, steps, max_minutes)
    click.echo("finished" if finished else "stopped at the time limit; continue with --resume")


def _int_list(text: str, lo: int, hi: int, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(not lo <= v <= hi for v in values):
        raise UserError(f"{name} must be integers in {lo}..{hi}, got {text!r}")
    return values


def _float_list(text: str, lo: float, hi: float, name: str) -> list[float]:
    """Comma-separated finite numbers in [lo, hi]; an empty text is an empty list."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if any(not lo <= v <= hi for v in values):  # also refuses nan
        raise UserError(f"{name} must be numbers in {lo:g}..{hi:g}, got {text!r}")
    return values


def _choice_list(text: str, choices: tuple[str, ...], name: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if not values or bad:
        raise UserError(f"{name}: unknown {', '.join(bad) or 'empty list'}; choose from {','.join(choices)}")
    return values


def _evaluation_bundles(model: str, teacher: str, samplers: list[str]) -> dict:
    """{"lcm": ..., "teacher": ...} Bundles the requested samplers need."""
    from .bundle import Bundle

    main = Bundle.load(registry.resolve(model))
    if not main.is_lcm:
        if "lcm" in samplers:
            raise UserError(f"--model {main.path} is a diffusion teacher: drop 'lcm' from --samplers or pass an LCM")
        return {"teacher": main}
    bundles = {"lcm": main}
    if any(s != "lcm" for s in samplers):
        bundles["teacher"] = Bundle.load(registry.resolve(teacher))
        if bundles["teacher"].is_lcm:
            raise UserError(f"--teacher {bundles['teacher'].path} is an LCM, not a diffusion teacher")
    return bundles


@cli.command()
@click.option("--preset", type=click.Choice(["table1", "lcm", "teacher"]), default="table1",
              help="table1: FID, KID, score and accuracy per sampler and step count; lcm: judge accuracy of the "
                   "LCM against the teacher's solvers (formerly evaluate-lcm); teacher: judge accuracy of a "
                   "teacher, its VAE PSNR and the judge on real images (formerly evaluate-teacher).")
@click.option("--model", default=None, metavar="NAME|DIR",
              help="LCM (or teacher) to evaluate [default: lcm if shipped]; preset teacher: a teacher here is "
                   "the one judged, else --teacher.")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Teacher for the DDIM/DPM rows.")
@click.option("--judge", "judge_dir", default="judge", metavar="NAME|DIR", help="Judge folder (features and scores).")
@click.option("--steps", "steps_text", default=None, show_default=f"1,2,4,8; teacher: {TEACHER_STEPS}",
              help="Comma-separated step counts (table1); one step count (teacher).")
@click.option("--lcm-steps", "lcm_steps_text", default=None, show_default="--steps",
              help="table1: the LCM row's step counts, when they differ from the teacher's (e.g. 1,2,4,8).")
@click.option("--samplers", "samplers_text", default=None,
              show_default="lcm and every teacher sampler (each solver with leading and trailing spacing); "
                           "teacher: ddim",
              help="Comma-separated (table1); one teacher sampler (teacher).")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=None,
              show_default="256", help="Held-out prompts per row.")
@click.option("--quick", is_flag=True, help="The quick setting: 256 prompts per row (not with --num-samples).")
@click.option("--guidance", type=FiniteRange(0, 50), default=None,
              help=f"Guidance scale g for every row [default: {LCM_GUIDANCE} for LCM, {TEACHER_GUIDANCE} for "
                   "the teacher].")
@click.option("--ceiling", is_flag=True,
              help="table1: add the teacher's guided ODE from t = 999 (DDIM trailing, 50 steps) at the LCM's g: "
                   "what the LCM distils towards.")
@click.option("--sweep-guidance", "sweep_text", default=None, metavar="G,G,...",
              help="table1: also score every row at these guidance scales and add a table of each method at its "
                   "best g (lowest KID).")
@click.option("--lcm-schedules", "lcm_schedules_text", default=None, metavar="grid,refine",
              show_default="the model's own",
              help="table1: the LCM rows once per timestep schedule (grid: diffusers' selection; refine: after the "
                   "first step, every step at low noise).")
@click.option("--guidance-max-t", type=click.IntRange(0, 10**6), default=None, metavar="T",
              help="table1: also score every teacher row (and, with --ceiling, the ODE) under a guidance interval: "
                   "CFG only at the steps with t <= T (what an LCM distilled with --guidance-max-t T follows).")
@click.option("--reference", type=click.Choice(["prompt-scenes", "independent"]), default="prompt-scenes",
              help="Real images FID/KID compare with: prompt-scenes (the committed reports': it holds the scenes "
                   "the prompts were written from) or independent (disjoint scenes).")
@click.option("--bootstrap", type=click.IntRange(0, 10000), default=0,
              help="Resamples of a bootstrap interval of FID per row (0: none).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, help="Seed of image 0 (image i: seed + i).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              show_default="runs/evaluate; runs/evaluate-lcm, runs/evaluate-teacher", help="Results folder.")
def evaluate(preset, model, teacher, judge_dir, steps_text, lcm_steps_text, samplers_text, num_samples, quick,
             guidance, ceiling, sweep_text, lcm_schedules_text, guidance_max_t, reference, bootstrap, batch_size, seed,
             out):
    """FID, KID, caption score and exact accuracy of the LCM and the teacher's solvers at each step count
    (the paper's Table 1): results.json, table1.md, table1.png, grids/. Samples are cached in OUT/samples,
    so rerunning with one more sampler only samples that one. Every row is scored by the same function
    (FID, KID x 10^3, precision/recall, size/position histogram distances), and results.json also holds
    the real-image floor: real images of the same prompts at the same n.

    \b
    Examples:
      lcm evaluate --steps 1,2,4,8 --num-samples 256 --out reports/table1
      lcm evaluate --preset lcm --num-samples 256 --out reports/lcm
      lcm evaluate --preset teacher --model teacher --num-samples 256 --out reports/teacher
    """
    from .evaluation import pipeline, presets
    from .evaluation.extractors import JudgeExtractor

    _torch_threads()
    if quick and num_samples is not None:
        raise UserError("--quick sets --num-samples; pass one of them")
    n = pipeline.QUICK_SAMPLES if quick else (num_samples if num_samples is not None else pipeline.NUM_SAMPLES)
    folder = Path(out) if out else Path("runs/evaluate" if preset == "table1" else f"runs/evaluate-{preset}")
    common = dict(batch_size=batch_size, seed=seed, reference=reference, bootstrap=bootstrap)
    if guidance_max_t is not None and preset != "table1":
        raise UserError("--guidance-max-t is for the table1 preset's teacher rows")
    if lcm_schedules_text is not None and preset != "table1":
        raise UserError("--lcm-schedules is for the table1 preset's LCM rows")
    lcm_schedules = (_choice_list(lcm_schedules_text, TIMESTEP_SCHEDULES, "--lcm-schedules")
                     if lcm_schedules_text is not None else None)
    if preset == "table1":
        steps = _int_list(steps_text or "1,2,4,8", 1, 1000, "--steps")
        samplers = _choice_list(samplers_text or ",".join((LCM_SAMPLER, *SAMPLER_CHOICES)), GENERATE_SAMPLERS,
                                "--samplers")
        bundles = _evaluation_bundles(model or default_model(), teacher, samplers + (["ddim"] if ceiling else []))
        extractor = JudgeExtractor.load(registry.resolve(judge_dir))
        lcm_steps = _int_list(lcm_steps_text, 1, 1000, "--lcm-steps") if lcm_steps_text else None
        options = dict(lcm_steps=lcm_steps, guidance_max_t=guidance_max_t, lcm_schedules=lcm_schedules)
        rows = pipeline.table_rows(samplers, steps, guidance, **options)
        sweep = [r for g in _float_list(sweep_text or "", 0, 50, "--sweep-guidance")
                 for r in pipeline.table_rows(samplers, steps, g, **options) if r not in rows]
        top = pipeline.Row("teacher", "ddim" + TRAILING, TEACHER_STEPS, LCM_GUIDANCE if guidance is None else guidance)
        tops = [top] + ([top._replace(guidance_max_t=guidance_max_t)] if guidance_max_t is not None else [])
        results = pipeline.run(bundles, rows, extractor, folder, n, ceiling=tops if ceiling else None, sweep=sweep,
                               **common)
        click.echo(pipeline.results_markdown(results) + str(folder / "results.json"))
    elif preset == "lcm":
        if steps_text or samplers_text:
            raise UserError("the lcm preset has fixed rows (LCM 1/2/4/8 steps, teacher DDIM and DPM-Solver++ "
                            "1/2/4, DDIM 50); use --preset table1 for your own --steps and --samplers")
        bundles = _evaluation_bundles(model or "lcm", teacher, ["ddim"])
        if "lcm" not in bundles:
            raise UserError(f"--model {bundles['teacher'].path} is a diffusion teacher; the lcm preset needs an LCM")
        rows = presets.LCM_TABLE_ROWS if guidance is None else [r._replace(guidance=guidance)
                                                                  for r in presets.LCM_TABLE_ROWS]
        meta = {"lcm": str(registry.resolve(model or "lcm")), "teacher": str(registry.resolve(teacher)),
                "judge": str(registry.resolve(judge_dir))}
        results = presets.lcm_table(bundles, JudgeExtractor.load(registry.resolve(judge_dir)), folder, n, rows,
                                    meta=meta, **common)
        click.echo(presets.markdown_table(results["rows"], results["floor"]) + str(folder / "results.json"))
    else:
        from .defaults import TEACHER_DEFAULTS

        steps = _int_list(steps_text or str(TEACHER_DEFAULTS[1]), 1, 1000, "--steps")
        samplers = _choice_list(samplers_text or TEACHER_DEFAULTS[0], SAMPLER_CHOICES, "--samplers")
        if len(steps) > 1 or len(samplers) > 1:
            raise UserError("the teacher preset judges one sampler at one step count; pass one --samplers and "
                            "one --steps value")
        bundles = _evaluation_bundles(model or "teacher", teacher, samplers)
        results, _ = presets.teacher(bundles["teacher"], JudgeExtractor.load(registry.resolve(judge_dir)), folder,
                                     n, samplers[0], steps[0], TEACHER_DEFAULTS[2] if guidance is None else guidance,
                                     **common)
        click.echo(json.dumps(results, indent=2) + "\n" + str(folder / "results.json"))


@cli.group()
def ablate():
    """The paper's ablations: solver x skipping step (Fig. 3) and guidance scale (Fig. 4)."""


def _solver_skip_pairs(solvers_text: str, skips_text: str, pairs_text: str | None) -> list[tuple[str, int]]:
    """--pairs SOLVER:K,... if given, else every --solvers x --skips pair; a bad k fails before any run."""
    from .schedules import training_grid

    if pairs_text is None:
        pairs = [(s, k) for s in _choice_list(solvers_text, SOLVER_CHOICES, "--solvers")
                 for k in _int_list(skips_text, 1, 1000, "--skips")]
    else:
        items = [v.strip() for v in pairs_text.split(",") if v.strip()]
        if not items or any(v.count(":") != 1 for v in items):
            raise UserError(f"--pairs: expected SOLVER:K,... (e.g. ddim:20,dpm-solver:20), got {pairs_text!r}")
        pairs = [(_choice_list(v.split(":")[0], SOLVER_CHOICES, "--pairs")[0],
                  _int_list(v.split(":")[1], 1, 1000, "--pairs")[0]) for v in items]
    for _, k in pairs:
        training_grid(1000, k)  # the teacher's own T is checked again when its run starts
    return list(dict.fromkeys(pairs))


@ablate.command("solver-skip")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Teacher to distil.")
@click.option("--judge", "judge_dir", default="judge", metavar="NAME|DIR", help="Judge folder.")
@click.option("--solvers", "solvers_text", default="ddim,dpm-solver,dpm-solver++", help="Comma-separated.")
@click.option("--skips", "skips_text", default="1,5,10,20,50", help="Comma-separated skipping steps k.")
@click.option("--pairs", "pairs_text", default=None, metavar="SOLVER:K,...",
              help="Run these (solver, k) pairs instead of every --solvers x --skips combination.")
@click.option("--iterations", type=click.IntRange(1, 10**6), default=1500, help="Distillation steps per run.")
@click.option("--eval-every", type=click.IntRange(1, 10**6), default=500, help="Probe 4-step KID/FID every N steps.")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=1000,
              help="Held-out prompts per probe (at 128 a perfect generator's FID is about 370; KID is unbiased).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16)
@click.option("--num-data", type=click.IntRange(1, 10**6), default=4000, help="World images (encoded once, shared).")
@click.option("--reference", type=click.Choice(["prompt-scenes", "independent"]), default="prompt-scenes",
              help="Real images FID/KID compare with (see lcm evaluate --help).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate-solver-skip")
def ablate_solver_skip(teacher, judge_dir, solvers_text, skips_text, pairs_text, iterations, eval_every,
                       num_samples, batch_size, num_data, reference, out):
    """Short distillations per (solver, k), 4-step KID and FID over iterations: results.json, results.md,
    solver-skip.png. Interrupted? Rerun the same command: finished runs are kept, the others resume.

    \b
    Example:
      lcm ablate solver-skip --solvers ddim --skips 1,20 --batch-size 8 --reference independent
    """
    from .evaluation import ablate as A
    from .evaluation.extractors import JudgeExtractor

    _torch_threads()
    pairs = _solver_skip_pairs(solvers_text, skips_text, pairs_text)
    results = A.solver_skip(registry.resolve(teacher), Path(out), pairs, iterations, eval_every,
                            JudgeExtractor.load(registry.resolve(judge_dir)), num_samples, batch_size, num_data,
                            reference=reference)
    click.echo(A.solver_skip_markdown(results["records"], results["floor"]) + str(Path(out) / "results.json"))


@ablate.command("guidance")
@click.option("--model", default="lcm", metavar="NAME|DIR", help="LCM to sample.")
@click.option("--judge", "judge_dir", default="judge", metavar="NAME|DIR", help="Judge folder.")
@click.option("--omegas", "omegas_text", default="2,4,8,12", help="Comma-separated paper guidance w (g = w + 1).")
@click.option("--steps", "steps_text", default="1,2,4,8", help="Comma-separated step counts.")
@click.option("--num-samples", type=click.IntRange(2, 100000), default=256)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@click.option("--reference", type=click.Choice(["prompt-scenes", "independent"]), default="prompt-scenes",
              help="Real images FID/KID compare with (see lcm evaluate --help).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate-guidance")
def ablate_guidance(model, judge_dir, omegas_text, steps_text, num_samples, batch_size, reference, out):
    """FID and caption score of the LCM against w at each step count: results.json, results.md, guidance.png.

    \b
    Example:
      lcm ablate guidance --omegas 2,4,8,12 --steps 1,2,4,8 --out reports/ablate-guidance
    """
    from .evaluation import ablate as A
    from .evaluation.extractors import JudgeExtractor

    _torch_threads()
    try:
        omegas = [float(v) for v in omegas_text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--omegas must be comma-separated numbers, got {omegas_text!r}") from None
    if not omegas or any(not 0 <= w <= 49 for w in omegas):
        raise UserError(f"--omegas must be numbers in 0..49, got {omegas_text!r}")
    steps = _int_list(steps_text, 1, 1000, "--steps")
    bundles = _evaluation_bundles(model, "teacher", ["lcm"])
    results = A.guidance(bundles, JudgeExtractor.load(registry.resolve(judge_dir)), Path(out), omegas, steps,
                         num_samples, batch_size, reference=reference)
    click.echo(A.guidance_markdown(results["records"]) + str(Path(out) / "results.json"))


@cli.command("prepare")
@click.option("--model", default="teacher", show_default=True, metavar="NAME|DIR",
              help="The model whose VAE and text encoder encode the data (the teacher you will distil).")
@click.option("--data", "data", required=True, metavar="SHARDS|FOLDER",
              help="Image shards ('shards/{000000..000009}.tar', a .tar, 'pipe:CMD') or an image folder.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder of the latent shards.")
@click.option("--text", type=click.Choice(["states", "captions"]), default="states", show_default=True,
              help="states: store the text encoder's states (training needs no text encoder); captions: only the "
                   "caption text (smaller; encoded per batch in training).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage precision of the latents and states (training reads fp32).")
@click.option("--shard-size", type=click.IntRange(1, 10**6), default=1000, show_default=True,
              help="Images per latent shard when --data is a folder (shards map one to one).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True, help="Encoder batch.")
@click.option("--min-size", type=click.IntRange(0, 10**5), default=0, show_default=True,
              help="Skip (and count) images whose shorter side is smaller.")
def prepare_cmd(model, data, out, text, dtype, shard_size, batch_size, min_size):
    """Encode images once into latent shards for `lcm distill --data` (see the README's shard format).

    Each input shard (or --shard-size images of a folder) becomes OUT/NNNNNN.tar plus a report NNNNNN.json;
    finished shards are kept, so an interrupted run continues where it stopped. Under `accelerate launch`
    each process encodes its own shards (shard i goes to process i % W).

    \b
    Examples:
      lcm world export data/shards --format shards --count 10000
      lcm prepare --data 'data/shards/{000000..000009}.tar' --out data/latents
      ACCELERATE_USE_CPU=true accelerate launch --num_processes 2 -m latentcm.cli prepare \\
          --data 'data/shards/{000000..000009}.tar' --out data/latents
      lcm distill --data 'data/latents/{000000..000009}.tar' --out runs/lcm-latents
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from .bundle import Bundle
    from .training.data import prepare as prep

    cfg = prep.PrepareConfig(text=text, dtype=dtype, shard_size=shard_size, batch_size=batch_size, min_size=min_size)
    bundle = Bundle.load(registry.resolve(model))
    if bundle.is_lcm:
        raise UserError(f"--model {bundle.path} is an LCM; prepare with the teacher you will distil")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    rank, world = state.process_index, state.num_processes
    bundle.to(state.device)
    num_units = len(prep.units(data, shard_size)[0])
    mine = len(range(rank, num_units, world))
    with tqdm(total=mine, desc=f"prepare (process {rank + 1}/{world})", unit="shard", disable=not state.is_main_process,
              dynamic_ncols=True) as bar:
        done = prep.prepare(bundle, data, Path(out), cfg, process_index=rank, num_processes=world, progress=bar.update)
    state.wait_for_everyone()
    if state.is_main_process:
        summary = prep.summarize(Path(out), num_units)
        skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
        click.echo(f"{summary['loaded']} samples in {num_units} latent shards ({done['skipped_existing']} kept from "
                   f"an earlier run by this process); skipped: {skipped}")
        if summary["missing_units"]:
            raise UserError(f"{len(summary['missing_units'])} shards are missing; rerun the same command to finish")
        click.echo(f"train with: lcm distill --teacher {model} --data '{summary['spec']}'")


@cli.group("world")
def world_group():
    """The procedural shapes world."""


@world_group.command("export")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["train", "heldout", "paraphrase"]), default="train")
@click.option("--count", type=click.IntRange(1, 10**6), default=1000)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0)
@click.option("--style", type=click.Choice(["none", "striped"]), default="none",
              help="striped: the fine-tuning set (striped objects, captions with 'striped'; splits train|heldout).")
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "shards"]), default="imagefolder",
              help="imagefolder: PNGs + metadata.jsonl; shards: webdataset tars 000000.tar, ... (png, txt, json).")
@click.option("--shard-size", type=click.IntRange(1, 10**6), default=1000, help="Samples per shard (--format shards).")
def world_export(out, split, count, seed, style, fmt, shard_size):
    """Write PNGs + metadata.jsonl (Hugging Face imagefolder layout), or webdataset shards.

    \b
    Examples (a custom set for `lcm finetune`; shards to stream with `lcm distill --data`):
      lcm world export data/striped-train --style striped --split train --count 4000
      lcm world export data/shards --format shards --count 4000 --shard-size 1000
    """
    from . import styles, world

    if fmt == "shards":
        if style != "none":
            raise UserError("--format shards writes the plain world (--style none)")
        click.echo(str(world.export_shards(out, seed, count, split, shard_size)))
    elif style == "none":
        click.echo(str(world.export_imagefolder(out, seed, count, split)))
    elif split not in styles.STYLE_SPLITS:
        raise UserError(f"the striped set has splits {', '.join(styles.STYLE_SPLITS)}, not {split!r}")
    else:
        click.echo(str(styles.export_styled(out, seed, count, split)))


def _command_line(ctx: click.Context, leave_out: tuple[str, ...] = ("resume", "max_minutes")) -> str:
    """The command with every option spelled out (for model cards); run-control options left out."""
    import shlex

    parts = ["lcm", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None or value is False:
            continue
        parts += [param.opts[0]] if value is True else [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _lora_config(rank: int | None, alpha: float | None, seed: int):
    """--lora RANK [--lora-alpha A] -> a LoRAConfig, or None without --lora."""
    if rank is None:
        if alpha is not None:
            raise UserError("--lora-alpha needs --lora RANK")
        return None
    from .models.lora import LoRAConfig

    return LoRAConfig(rank=rank, alpha=alpha, seed=seed)


def _run_options(command):
    """Options the consistency-training commands (distill, finetune) share."""
    for option in reversed([
        click.option("--huber-c", type=FiniteRange(0, 1, min_open=True), default=0.001, help="c of pseudo-Huber."),
        click.option("--student-ema", type=FiniteRange(0, 1, max_open=True), default=0.0, metavar="DECAY",
                     help="Also keep a slow EMA of the student (e.g. 0.999) and export it instead of the online "
                          "weights; 0: off. Full UNet only (not --lora)."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=16, help="Batch per process."),
        click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, help="Seed of the training batches."),
        click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT."),
        click.option("--max-minutes", type=FiniteRange(0.1, None), default=None,
                     help="Stop cleanly (with a checkpoint) after this long; continue later with --resume."),
        click.option("--checkpoint-every", type=click.IntRange(1, 10**7), default=200, help="Checkpoint every N steps."),
        click.option("--gradient-checkpointing", is_flag=True,
                     help="Recompute the student's activations in the backward pass: less memory, same result."),
        click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no",
                     help="Teacher and EMA target stored in half, the student fp32 under autocast; solver and loss "
                          "fp32 (no: fp32, or what accelerate launch --mixed_precision set)."),
        click.option("--gradient-accumulation", type=click.IntRange(1, 4096), default=1, metavar="N",
                     help="Micro-batches per optimizer step (effective batch N x --batch-size x processes)."),
        click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw",
                     help="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA; CPU where the installed bitsandbytes has it)."),
    ]):
        command = option(command)
    return command


@cli.command()
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Shipped teacher name or diffusers SD folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; receives the LCM folder.")
@click.option("--solver", type=click.Choice(SOLVER_CHOICES), default="ddim", help="ODE solver Psi of the target.")
@click.option("--skip", type=click.IntRange(1, 1000), default=SKIP, metavar="K", help="Skipping interval k (grid T // k).")
@click.option("--omega-min", type=FiniteRange(0, 50), default=None, show_default=f"{OMEGA_RANGE[0]:g}; {LORA_OMEGA:g} with --lora",
              help="Lowest paper guidance w (g = 1 + w).")
@click.option("--omega-max", type=FiniteRange(0, 50), default=None, show_default=f"{OMEGA_RANGE[1]:g}; {LORA_OMEGA:g} with --lora",
              help=f"Highest paper guidance w (--lora: the paper's fixed w = {LORA_OMEGA:g}, no w embedding).")
@click.option("--guidance-max-t", type=click.IntRange(0, 10**6), default=None, metavar="T",
              show_default="none: every t",
              help="Guidance in a limited interval (Kynkaanniemi et al. 2024): the teacher's ODE step from t_{n+k} is "
                   "guided only where t_{n+k} <= T, unguided (w = 0) above; the student still takes w at every t.")
@click.option("--ema", type=FiniteRange(0, 1, max_open=True), default=None, show_default="0.95; 0 with --lora",
              help="EMA rate mu of the target network (the paper's: 0.999943; --lora 0: the online adapter).")
@click.option("--loss", type=click.Choice(["l2", "huber"]), default="l2", help="Distance d (huber: pseudo-Huber).")
@click.option("--max-steps", type=click.IntRange(1, 10**7), default=2000, help="Optimizer steps.")
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), default=1e-4, help="AdamW learning rate (peak).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              help="constant, or cosine decay from --lr to --lr x --min-lr-ratio at --max-steps.")
@click.option("--min-lr-ratio", type=FiniteRange(0, 1), default=0.1, help="Final lr / --lr of the cosine schedule.")
@click.option("--grad-clip", type=FiniteRange(0, None, min_open=True), default=1.0, help="Gradient-norm clip.")
@click.option("--num-data", type=click.IntRange(1, 10**6), default=10000, help="Shapes-world images, encoded once.")
@click.option("--data", "data_dir", default=None, metavar="FOLDER|SHARDS",
              help="Distil on this image folder (metadata.jsonl or .txt captions), or stream webdataset shards "
                   "('shards/{000000..000009}.tar', a .tar path, 'pipe:CMD'), instead of the shapes world.")
@click.option("--proportion-empty-prompts", type=FiniteRange(0, 1), default=None, show_default="0",
              help="Shards: replace this share of captions by the empty prompt (deterministic per sample).")
@click.option("--time-cond-proj-dim", type=click.IntRange(4, 4096), default=256, help="Size of the w embedding.")
@click.option("--cond-proj-init", type=click.Choice(["zero", "default"]), default="zero",
              help="Init of the w projection: zero (the student starts as the teacher) or PyTorch's default "
                   "(as diffusers' scripts).")
@click.option("--cond-proj-inputs", type=click.Choice(["all", "smooth"]), default="all",
              help="w-embedding entries the w projection reads: all, or only those smooth over [w_min, w_max] "
                   "(the others alias: nearby w get unrelated values). Full UNet only.")
@click.option("--cond-proj-lr-scale", type=FiniteRange(0, 1000, min_open=True), default=1.0, metavar="X",
              help="Train the w projection at X times --lr (the rest of the student at --lr). Full UNet only.")
@click.option("--init-student", default=None, metavar="NAME|DIR",
              help="Start the student (and its target) from this LCM instead of the teacher: continue a "
                   "distillation on a new schedule. Full UNet only; it must have the teacher's architecture.")
@click.option("--validate-every", type=click.IntRange(0, 10**7), default=500, help="Validation grid every N steps (0: off).")
@click.option("--lora", "lora_rank", type=click.IntRange(1, 4096), default=None, metavar="RANK",
              help="LCM-LoRA: train a rank-RANK LoRA on the teacher's UNet (paper 64; 16 for the tiny teacher).")
@click.option("--lora-alpha", type=FiniteRange(0, None, min_open=True), default=None,
              show_default="RANK (scale 1)", help="LoRA alpha (scale alpha / RANK).")
@_run_options
def distill(teacher, out, solver, skip, omega_min, omega_max, guidance_max_t, ema, student_ema, loss, huber_c,
            max_steps, batch_size, lr, lr_schedule, min_lr_ratio, grad_clip, seed, resume, max_minutes, num_data,
            data_dir, time_cond_proj_dim, cond_proj_init, cond_proj_inputs, cond_proj_lr_scale, init_student,
            validate_every, checkpoint_every, lora_rank, lora_alpha, gradient_checkpointing, proportion_empty_prompts,
            **memory):
    """Latent Consistency Distillation (LCM Algorithm 1) of a teacher into a few-step LCM.

    OUT ends up a LatentConsistencyModelPipeline folder (plus checkpoints/, metrics.csv,
    previews/). Runs on one process, or data-parallel under `accelerate launch` (--batch-size
    is per process). Interrupted? Rerun the same command with --resume.

    With --lora RANK it is LCM-LoRA (arXiv 2311.05556): only a LoRA adapter on the teacher's
    UNet trains, with no w embedding; OUT receives pytorch_lora_weights.safetensors (diffusers),
    lcm_lora_kohya.safetensors (kohya-ss keys), scheduler_config.json and README.md.

    \b
    Examples:
      lcm distill --teacher teacher --out runs/lcm --max-steps 2000 --loss huber
      lcm distill --teacher teacher --out runs/lcm-lora --lora 16 --loss huber
      ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
          -m latentcm.cli distill --out runs/lcm2      # two CPU processes (gloo)
    """
    from dataclasses import asdict

    from .training import recipes
    from .training.consistency import LCDConfig
    from .training.loop import LoopConfig

    _torch_threads()
    lora = _lora_config(lora_rank, lora_alpha, seed)
    if lora and student_ema:
        raise UserError("--student-ema is for full-UNet distillation; with --lora the adapter's --ema is the target")
    if lora and cond_proj_lr_scale != 1.0:
        raise UserError("--cond-proj-lr-scale is for full-UNet distillation; LCM-LoRA has no w projection")
    if lora and cond_proj_inputs != "all":
        raise UserError("--cond-proj-inputs is for full-UNet distillation; LCM-LoRA has no w projection")
    if lora and init_student:
        raise UserError("--init-student is for full-UNet distillation; LCM-LoRA trains an adapter on the teacher")
    w_default = (LORA_OMEGA, LORA_OMEGA) if lora else OMEGA_RANGE
    cfg = LCDConfig(solver=solver, skip=skip, omega_min=w_default[0] if omega_min is None else omega_min,
                    omega_max=w_default[1] if omega_max is None else omega_max,
                    ema_decay=(0.0 if lora else 0.95) if ema is None else ema, student_ema=student_ema,
                    loss=loss, huber_c=huber_c, batch_size=batch_size, seed=seed,
                    time_cond_proj_dim=time_cond_proj_dim, cond_proj_init=cond_proj_init,
                    cond_proj_lr_scale=cond_proj_lr_scale, gradient_checkpointing=gradient_checkpointing,
                    guidance_max_t=guidance_max_t, cond_proj_inputs=cond_proj_inputs)
    loop_cfg = LoopConfig(max_steps=max_steps, lr=lr, warmup=0, schedule=lr_schedule, min_lr_ratio=min_lr_ratio,
                          grad_clip=grad_clip, checkpoint_every=checkpoint_every,
                          preview_every=validate_every, max_minutes=max_minutes, **memory,
                          extra_meta={"lcd": asdict(cfg), **({"lora": asdict(lora)} if lora else {})})
    from .training.data.shards import is_shard_spec

    shards = data_dir if data_dir and is_shard_spec(data_dir) else None
    if proportion_empty_prompts and shards is None:
        raise UserError("--proportion-empty-prompts needs webdataset shards as --data")
    job = recipes.Job(registry.resolve(teacher), Path(out), loop_cfg, lcd=cfg, lora=lora,
                      data_dir=Path(data_dir) if data_dir and not shards else None, num_data=num_data, resume=resume,
                      data_shards=shards, shard_options={"proportion_empty_prompts": proportion_empty_prompts or 0.0},
                      init_student=registry.resolve(init_student) if init_student else None,
                      command=_command_line(click.get_current_context()))
    result = recipes.run("distill-lora" if lora else "distill", job)
    done, folder = result.steps, result.folder
    click.echo(str(folder) if folder else f"stopped at step {done} (time limit); continue with --resume")


@cli.command()
@click.option("--model", default="lcm", metavar="NAME|DIR", help="The LCM to adapt.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Image folder: metadata.jsonl (file_name, text) or <image>.txt captions.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; receives the LCM folder.")
@click.option("--skip", type=click.IntRange(1, 1000), default=None, metavar="K",
              help="Skipping interval k [default: the LCM's own grid, T // original_inference_steps].")
@click.option("--omega-min", type=FiniteRange(0, 50), default=OMEGA_RANGE[0], help="Lowest paper guidance w (g = 1 + w).")
@click.option("--omega-max", type=FiniteRange(0, 50), default=OMEGA_RANGE[1], help="Highest paper guidance w.")
@click.option("--ema", type=FiniteRange(0, 1, max_open=True), default=0.95, help="EMA rate mu of the target.")
@click.option("--loss", type=click.Choice(["l2", "huber"]), default="huber", help="Distance d (huber: pseudo-Huber).")
@click.option("--max-steps", type=click.IntRange(1, 10**7), default=1000, help="Optimizer steps.")
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), default=5e-5, help="AdamW learning rate (constant).")
@click.option("--validate-every", type=click.IntRange(0, 10**7), default=250, help="Validation grid every N steps (0: off).")
@click.option("--max-timestep", type=click.IntRange(0, 100000), default=499,
              help="Train only grid points t <= this: adapt the low-noise end (texture, style) and leave the "
                   "high-noise end (layout, attributes) alone; the number of train timesteps - 1 trains all.")
@_run_options
def finetune(model, data_dir, out, skip, omega_min, omega_max, ema, student_ema, loss, huber_c, max_steps, batch_size,
             lr, seed, resume, max_minutes, validate_every, checkpoint_every, max_timestep, gradient_checkpointing, **memory):
    """Latent Consistency Fine-tuning (LCF): adapt an LCM to your image-caption folder, no teacher needed.

    Unreadable images and images without a caption are skipped, counted and reported at the end.
    OUT ends up a LatentConsistencyModelPipeline folder (plus checkpoints/, metrics.csv, previews/).

    \b
    Example:
      lcm world export data/striped --style striped --count 4000
      lcm finetune --model lcm --data data/striped --out runs/lcf --max-steps 1000
    """
    from dataclasses import asdict

    from .training import recipes
    from .training.consistency import LCDConfig
    from .training.loop import LoopConfig

    _torch_threads()
    model_dir = registry.resolve(model)
    k = skip if skip is not None else recipes.lcm_skip(recipes.load_source(model_dir, "lcm"))
    cfg = LCDConfig(skip=k, omega_min=omega_min, omega_max=omega_max, ema_decay=ema, student_ema=student_ema,
                    loss=loss, huber_c=huber_c, batch_size=batch_size, seed=seed, target="same-noise", max_timestep=max_timestep,
                    gradient_checkpointing=gradient_checkpointing)
    loop_cfg = LoopConfig(max_steps=max_steps, lr=lr, warmup=0, schedule="constant", checkpoint_every=checkpoint_every,
                          preview_every=validate_every, max_minutes=max_minutes, **memory,
                          extra_meta={"lcf": asdict(cfg)})
    result = recipes.run("finetune", recipes.Job(model_dir, Path(out), loop_cfg, lcd=cfg, data_dir=Path(data_dir),
                                                 resume=resume, command=_command_line(click.get_current_context())))
    done, folder, report = result.steps, result.folder, result.report
    click.echo(report.summary())
    for reason, names in sorted(report.skipped.items()):
        click.echo(f"  {reason}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
    click.echo(str(folder) if folder else f"stopped at step {done} (time limit); continue with --resume")


@cli.command("finetune-teacher")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Diffusion teacher to fine-tune.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Image folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; becomes a teacher folder.")
@click.option("--max-steps", type=click.IntRange(1, 10**7), default=1000)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), default=1e-4, help="AdamW learning rate (constant).")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--max-minutes", type=FiniteRange(0.1, None), default=None, help="Stop cleanly after this long.")
@click.option("--lora", "lora_rank", type=click.IntRange(1, 4096), default=None, metavar="RANK",
              help="Train only a LoRA adapter of this rank: OUT becomes a style-LoRA folder.")
@click.option("--lora-alpha", type=FiniteRange(0, None, min_open=True), default=None,
              show_default="RANK", help="LoRA alpha (scale alpha / rank).")
def finetune_teacher(teacher, data_dir, out, max_steps, batch_size, lr, seed, resume, max_minutes, lora_rank,
                     lora_alpha):
    """Plain diffusion fine-tuning of a teacher on an image folder (then `lcm distill --data` it again):
    the baseline LCF is measured against. With --lora RANK only a LoRA adapter trains and OUT
    becomes a style LoRA that stacks with an LCM-LoRA in `lcm generate --lora`.

    \b
    Examples:
      lcm finetune-teacher --data data/striped --out runs/teacher-striped --max-steps 1000
      lcm distill --teacher runs/teacher-striped --data data/striped --out runs/lcm-striped
      lcm finetune-teacher --data data/striped --out runs/style-lora --lora 16 --lr 5e-4
      lcm generate "a red striped star" --model teacher --lora runs/lcm-lora --lora runs/style-lora:0.8
    """
    from .training import recipes
    from .training.loop import LoopConfig

    _torch_threads()
    loop_cfg = LoopConfig(max_steps=max_steps, lr=lr, warmup=0, schedule="constant", max_minutes=max_minutes)
    job = recipes.Job(registry.resolve(teacher), Path(out), loop_cfg, lora=_lora_config(lora_rank, lora_alpha, seed),
                      data_dir=Path(data_dir), diffusion={"batch_size": batch_size, "seed": seed}, resume=resume,
                      command=_command_line(click.get_current_context()))
    result = recipes.run("finetune-teacher", job)
    click.echo(result.report.summary())
    click.echo(str(result.folder) if result.folder else
               f"stopped at step {result.steps} (time limit); continue with --resume")


@cli.command("export")
@click.option("--model", default="lcm", metavar="NAME|DIR", help="Shipped LCM name or LCM folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder for the pipeline.")
@click.option("--fp16", is_flag=True, help='Also write float16 weights (diffusers variant="fp16").')
@click.option("--single-file", is_flag=True, help="Also write OUT/<name>.safetensors: all weights (latentcm layout).")
@click.option("--base-model", default=None, metavar="TEXT",
              show_default="the source card's base_model, else its folder name", help="Model card base_model.")
def export_model(model, out, fp16, single_file, base_model):
    """Export an LCM as a complete diffusers LatentConsistencyModelPipeline folder with a model card.

    The card's YAML front matter names library_name, base_model, tags, pipeline_tag and the
    recommended 4 steps at guidance 8.5. Prints the folder.

    \b
    Examples:
      lcm export --model lcm --out release/lcm --fp16
      lcm export --model runs/lcm --out release/my-lcm --single-file --base-model my-org/my-teacher
    """
    from .export.release import export_release

    click.echo(str(export_release(registry.resolve(model), out, fp16=fp16, single_file=single_file,
                                  base_model=base_model)))


@cli.command()
@click.option("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, help="Port (0: any free port).")
@click.option("--lcm", "lcm_model", default="lcm", metavar="NAME|DIR", help="Shipped LCM name or LCM folder.")
@click.option("--teacher", default="teacher", metavar="NAME|DIR|none", help="Teacher beside the LCM ('none': off).")
@click.option("--lora", "loras", multiple=True, metavar="NAME=PATH", help="Register a LoRA clients may stack by NAME.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, help="Images per UNet batch (1: no batching).")
@click.option("--batch-window-ms", type=FiniteRange(0, 1000), default=20.0, help="How long a batch waits to fill.")
@click.option("--max-queue", type=click.IntRange(1, 10000), default=64, help="Waiting requests before HTTP 429.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", help="bf16: opt-in bfloat16 autocast.")
@click.option("--compile", "compile_unet", is_flag=True,
              help="channels_last + torch.compile of the UNets: ~40 s per batch size on first use, then "
                   "1.25-1.5x at batch 16 on CPU.")
@click.option("--no-ui", is_flag=True, help="Serve the HTTP/JSON API and /health only.")
def serve(host, port, lcm_model, teacher, loras, max_batch, batch_window_ms, max_queue, dtype, compile_unet, no_ui):
    """Serve the LCM as a web demo (gradio, at /) and an HTTP/JSON API that batches concurrent requests.

    POST /api/generate takes JSON (prompt, steps, guidance, seed, num_images, height, width, gamma,
    loras, init_image as base64, strength) and answers PNGs as base64 with timings; GET /health.

    \b
    Example:
      lcm serve --port 7860 --lora lcm-lora=runs/lcm-lora
    """
    registered = {}
    for spec in loras:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora takes NAME=PATH, got {spec!r}")
        registered[name] = path
    try:
        from .serve.app import run
        from .serve.service import ServeConfig

        config = ServeConfig(lcm=lcm_model, teacher=None if teacher == "none" else teacher, loras=registered,
                             max_batch=max_batch, window_ms=batch_window_ms, max_queue=max_queue, dtype=dtype,
                             compile=compile_unet)
        run(config, host=host, port=port, ui=not no_ui, ready=lambda url: click.echo(f"serving {url}", err=True))
    except ImportError as exc:
        raise UserError(f"lcm serve needs gradio ({exc.name} is missing): pip install 'latentcm[serve]'") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point: click errors and bad input become one line and exit code 2."""
    from .errors import ModelError

    try:
        cli.main(args=argv, prog_name="lcm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("lcm: aborted", err=True)
        sys.exit(1)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # `lcm` / `lcm ablate` alone: the help
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.ClickException as exc:
        click.echo(f"lcm: error: {' '.join(exc.format_message().split())}", err=True)  # click's can be multi-line
        sys.exit(2 if isinstance(exc, (click.UsageError, UserError)) else exc.exit_code)
    except (ModelError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        click.echo(f"lcm: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
