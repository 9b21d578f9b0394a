"""Evaluation commands: ``lcm evaluate`` (presets table1, lcm, teacher) and ``lcm ablate`` (Fig. 3 and 4)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .. import registry
from ..defaults import LCM_GUIDANCE, LCM_SAMPLER, TEACHER_GUIDANCE, TEACHER_SAMPLERS
from ..defaults import TEACHER_STEPS, TIMESTEP_SCHEDULES
from .app import cli
from .options import GENERATE_SAMPLERS, FiniteRange, UserError, _choice_list, _float_list, _step_list
from .options import _torch_threads, default_model, judge_option, reference_option, seed_option

TABLE1_RESAMPLES = 1000  # resamples of Table 1's (and the lcm preset's) sampling intervals and paired differences


def _evaluation_bundles(model: str, teacher: str, samplers: list[str]) -> dict:
    """{"lcm": ..., "teacher": ...} Bundles the requested samplers need."""
    from ..bundle import Bundle

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


def _judge(judge_dir: str):
    from ..evaluation.extractors import JudgeExtractor

    return JudgeExtractor.load(registry.resolve(judge_dir))


@cli.command()
@click.option("--preset", type=click.Choice(["table1", "lcm", "teacher"]), default="table1",
              help="table1: FID, KID, score and accuracy per sampler and step count; lcm: judge accuracy of the "
                   "LCM against the teacher's solvers (formerly evaluate-lcm); teacher: judge accuracy of a "
                   "teacher, its VAE PSNR and the judge on real images (formerly evaluate-teacher).")
@click.option("--model", default=None, metavar="NAME|DIR",
              help="LCM (or teacher) to evaluate [default: lcm if shipped]; preset teacher: a teacher here is "
                   "the one judged, else --teacher.")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Teacher for the DDIM/DPM rows.")
@judge_option("Judge folder (features and scores).")
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
@click.option("--guidance", type=FiniteRange(0, 50), default=None,
              help=f"Guidance scale g for every row [default: the LCM's own (its sampling.json; else {LCM_GUIDANCE}), "
                   f"{TEACHER_GUIDANCE} for the teacher].")
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
@reference_option("Real images FID/KID compare with: prompt-scenes (the committed reports': it holds the scenes "
                  "the prompts were written from) or independent (disjoint scenes).")
@click.option("--bootstrap", type=click.IntRange(0, 10000), default=None, show_default="table1, lcm: 1000; teacher: 0",
              help="table1, lcm: resamples of every row's 95% sampling intervals and paired differences (prompts "
                   "and seeds resampled jointly with the reference; 0: none); teacher: of a bootstrap interval of "
                   "FID.")
@click.option("--baseline", default=None, metavar="SAMPLER", show_default="lcm when it is among --samplers",
              help="table1: the method every row is compared with, paired (row - baseline on the same prompts and "
                   "seeds) at each step count and g; an LCM on several --lcm-schedules: its own schedule.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@seed_option("Seed of image 0 (image i: seed + i).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              show_default="runs/evaluate; runs/evaluate-lcm, runs/evaluate-teacher", help="Results folder.")
def evaluate(preset, num_samples, reference, bootstrap, batch_size, seed, out, **options):
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
    from ..evaluation import pipeline

    _torch_threads()
    n = num_samples if num_samples is not None else pipeline.NUM_SAMPLES
    folder = Path(out) if out else Path("runs/evaluate" if preset == "table1" else f"runs/evaluate-{preset}")
    common = dict(batch_size=batch_size, seed=seed, reference=reference, bootstrap=bootstrap or 0)
    for name, flag in (("guidance_max_t", "--guidance-max-t"), ("lcm_schedules_text", "--lcm-schedules"),
                       ("baseline", "--baseline")):
        if options[name] is not None and preset != "table1":
            raise UserError(f"{flag} is for the table1 preset")
    if preset in ("table1", "lcm"):
        common["bootstrap"] = TABLE1_RESAMPLES if bootstrap is None else bootstrap
    run = {"table1": _table1, "lcm": _lcm_preset, "teacher": _teacher_preset}[preset]
    click.echo(run(folder=folder, n=n, common=common, **options))


def _table1(model, teacher, judge_dir, steps_text, lcm_steps_text, samplers_text, guidance, ceiling, sweep_text,
            lcm_schedules_text, guidance_max_t, baseline, folder, n, common) -> str:
    """Preset table1 (``pipeline.run`` on ``presets.table1_rows``); what evaluate prints."""
    from ..evaluation import pipeline, presets, reports

    schedules = (_choice_list(lcm_schedules_text, TIMESTEP_SCHEDULES, "--lcm-schedules")
                 if lcm_schedules_text is not None else None)
    steps = _step_list(steps_text or "1,2,4,8", "--steps")
    samplers = _choice_list(samplers_text or ",".join((LCM_SAMPLER, *TEACHER_SAMPLERS)), GENERATE_SAMPLERS,
                            "--samplers")
    lcm_steps = _step_list(lcm_steps_text, "--lcm-steps") if lcm_steps_text else None
    sweep_guidance = _float_list(sweep_text or "", 0, 50, "--sweep-guidance")
    if baseline is not None and baseline not in samplers:
        raise UserError(f"--baseline {baseline!r} is not one of --samplers ({', '.join(samplers)})")
    baseline = baseline or (LCM_SAMPLER if LCM_SAMPLER in samplers else None)
    bundles = _evaluation_bundles(model or default_model(), teacher, samplers + (["ddim"] if ceiling else []))
    lcm_g = bundles["lcm"].defaults[2] if "lcm" in bundles else LCM_GUIDANCE
    rows, sweep, tops = presets.table1_rows(samplers, steps, guidance, lcm_steps=lcm_steps,
                                            guidance_max_t=guidance_max_t, lcm_schedules=schedules,
                                            sweep_guidance=sweep_guidance, ceiling=ceiling, lcm_guidance=lcm_g)
    extractor = _judge(judge_dir)
    resamples = common.pop("bootstrap")  # the rows' sampling intervals replace FID's own bootstrap here
    results = pipeline.run(bundles, rows, extractor, folder, n, ceiling=tops, sweep=sweep, intervals=resamples,
                           baseline=baseline, **common)
    return reports.results_markdown(results) + str(folder / "results.json")


def _lcm_preset(model, teacher, judge_dir, steps_text, samplers_text, guidance, folder, n, common, **_) -> str:
    """Preset lcm (``presets.lcm_table``); what evaluate prints."""
    from ..evaluation import presets

    if steps_text or samplers_text:
        raise UserError("the lcm preset has fixed rows (LCM 1/2/4/8 steps, teacher DDIM and DPM-Solver++ "
                        "1/2/4, DDIM 50); use --preset table1 for your own --steps and --samplers")
    bundles = _evaluation_bundles(model or "lcm", teacher, ["ddim"])
    if "lcm" not in bundles:
        raise UserError(f"--model {bundles['teacher'].path} is a diffusion teacher; the lcm preset needs an LCM")
    rows = presets.lcm_preset_rows(bundles["lcm"].defaults[2], guidance)
    meta = {"lcm": str(registry.resolve(model or "lcm")), "teacher": str(registry.resolve(teacher)),
            "judge": str(registry.resolve(judge_dir))}
    resamples = common.pop("bootstrap")  # sampling intervals, as table1's
    results = presets.lcm_table(bundles, _judge(judge_dir), folder, n, rows, meta=meta, intervals=resamples, **common)
    return presets.markdown_table(results["rows"], results["floor"]) + str(folder / "results.json")


def _teacher_preset(model, teacher, judge_dir, steps_text, samplers_text, guidance, folder, n, common, **_) -> str:
    """Preset teacher (``presets.teacher``): one sampler at one step count; what evaluate prints."""
    from ..evaluation import presets

    steps = _step_list(steps_text or str(TEACHER_STEPS), "--steps")
    samplers = _choice_list(samplers_text or "ddim", TEACHER_SAMPLERS, "--samplers")
    if len(steps) > 1 or len(samplers) > 1:
        raise UserError("the teacher preset judges one sampler at one step count; pass one --samplers and "
                        "one --steps value")
    bundles = _evaluation_bundles(model or "teacher", teacher, samplers)
    results, _ = presets.teacher(bundles["teacher"], _judge(judge_dir), folder, n, samplers[0], steps[0],
                                 TEACHER_GUIDANCE if guidance is None else guidance, **common)
    return json.dumps(results, indent=2) + "\n" + str(folder / "results.json")
