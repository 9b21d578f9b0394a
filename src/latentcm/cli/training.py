"""Training commands: ``lcm distill``, ``lcm finetune``, ``lcm finetune-teacher`` and ``lcm train-teacher``;
each builds a ``recipes.Job`` (or a teacher-build call) and runs it."""
from __future__ import annotations

from pathlib import Path

import click

from .. import registry
from ..defaults import LORA_OMEGA, OMEGA_RANGE, RENOISE, SKIP, TEACHER_SOLVERS, TIMESTEP_SCHEDULES
from .app import cli
from .options import FiniteRange, _command_line, _lora_config, _loop_config, _run_options, _stopped
from .options import _torch_threads, lora_rank_options, seed_option
from .distill_checks import check_full_unet_only, check_guidance_mode, check_stage, shard_share


@cli.command("train-teacher")
@click.argument("stage", type=click.Choice(["vae", "clip", "judge", "unet", "all", "export"]))
@click.option("--out", type=click.Path(file_okay=False), default="runs/build", help="Build folder.")
@click.option("--preset", type=click.Choice(["default", "micro"]), default="default", help="Component sizes.")
@seed_option("Initialisation/batch seed.")
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
    from ..teacher_build import stages as build

    _torch_threads()
    out_dir = Path(out)
    if stage == "export":
        click.echo(str(build.export_teacher(out_dir)))
        return
    stages = list(build.STAGES) if stage == "all" else [stage]
    finished = build.run_stages(out_dir, stages, preset, seed, resume, steps, max_minutes)
    click.echo("finished" if finished else "stopped at the time limit; continue with --resume")


@cli.command()
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Shipped teacher name or diffusers SD folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; receives the LCM folder.")
@click.option("--solver", type=click.Choice(TEACHER_SOLVERS), default="ddim", help="ODE solver Psi of the target.")
@click.option("--skip", type=click.IntRange(1, 1000), default=SKIP, metavar="K",  # 1000: k at most T
              help="Skipping interval k (grid T // k).")
@click.option("--omega-min", type=FiniteRange(0, 50), default=None, show_default=f"{OMEGA_RANGE[0]:g}; {LORA_OMEGA:g} with --lora",
              help="Lowest paper guidance w (g = 1 + w).")
@click.option("--omega-max", type=FiniteRange(0, 50), default=None, show_default=f"{OMEGA_RANGE[1]:g}; {LORA_OMEGA:g} with --lora",
              help=f"Highest paper guidance w (--lora: the paper's fixed w = {LORA_OMEGA:g}, no w embedding).")
@click.option("--omega-zero-share", type=FiniteRange(0, 1), default=0.0, metavar="P",
              help="Draw this share of w at exactly 0 (g = 1, the unguided ODE) instead of from [w_min, w_max], so "
                   "the low end of the w input gets its own signal. Needs a w input (not --lora or cfg mode).")
@click.option("--low-w-skip", type=click.IntRange(1, 1000), default=None, metavar="K", show_default="none: --skip",
              help="Skipping interval k for the samples with w <= --low-w-max (their t_{n+k} on that k's grid), "
                   "--skip for the rest: the skip as a function of w. Needs a w input.")
@click.option("--low-w-max", type=FiniteRange(0, 50), default=0.0, metavar="W",
              help="The highest w that --low-w-skip applies to (0: only the samples at w = 0).")
@click.option("--noise-start-share", type=FiniteRange(0, 1), default=0.0, metavar="P",
              help="Start this share of the samples where the sampler starts: t_{n+k} at the grid's top point and "
                   "its input pure noise N(0, I), not data noised to it (which still carries sqrt(alpha_bar_T) of "
                   "the image, so the student never meets a start that disagrees with its caption).")
@click.option("--ode-start-share", type=FiniteRange(0, 1), default=0.0, metavar="P",
              help="Take this share of the samples' inputs from the teacher's guided ODE (at their w) run from pure "
                   "noise down to their t_{n+k} (--ode-start-steps solver steps) instead of data noised to it: the "
                   "states the sampler meets. Costs those steps' teacher passes.")
@click.option("--ode-start-steps", type=click.IntRange(1, 100), default=2, metavar="S",
              help="Solver steps of an ODE start (--ode-start-share).")
@click.option("--ode-pair-share", type=FiniteRange(0, 1), default=0.0, metavar="P",
              help="Train this share of the samples on ODE pairs: the teacher's guided ODE (at their w) from pure "
                   "noise to t = 0 in --ode-pair-steps steps; the input is its state at one of those steps' start "
                   "points, the target its end point, in place of the EMA target's output (no bootstrapping up the "
                   "grid). Costs those steps' teacher passes.")
@click.option("--ode-pair-steps", type=click.IntRange(2, 1000), default=20, metavar="S",
              help="Solver steps of an ODE pair's trajectory (--ode-pair-share); its start points are 999, "
                   "999 - 1000/S, ...")
@click.option("--ode-pair-starts", type=click.Choice(["uniform", "top"]), default="uniform",
              help="Where an ODE pair's input lies (--ode-pair-share): uniform over its trajectory's start points, or "
                   "always at the top point (pure noise: the map of Algorithm 3's first step).")
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
@click.option("--proportion-empty-prompts", type=FiniteRange(0, 1, max_open=True), default=None,
              show_default="0; 0.1 with --guidance-mode cfg",
              help="Replace this share of captions by the empty prompt (deterministic per sample or per batch).")
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
@click.option("--stage", type=click.Choice(["consistency", "guidance"]), default="consistency",
              help="consistency: LCD (an LCM). guidance: guidance distillation (Meng et al. 2023 stage 1): the "
                   "w-conditioned student learns the teacher's CFG output at every t, w ~ U[0, 11] by default; OUT "
                   "becomes a guided-teacher folder for --init-student / --guided-teacher.")
@click.option("--guidance-mode", type=click.Choice(["embedding", "cfg"]), default="embedding",
              help="embedding: w is a student input (LCM Sec. 4.2; one pass per step, no negative prompt). cfg: distil "
                   "the unguided ODE (w = 0, 10% empty prompts unless --proportion-empty-prompts) into a student "
                   "without a w input, sampled with real CFG at small g (two passes, negative prompts work).")
@click.option("--guided-teacher", default=None, metavar="DIR",
              help="A --stage guidance output that replaces the teacher in LCD's solver step: one UNet pass per "
                   "stage instead of two (CFG distilled in). Full UNet only.")
@click.option("--schedule", "sampling_schedule", type=click.Choice(TIMESTEP_SCHEDULES), default=None,
              show_default="grid", help="Timestep schedule the exported LCM samples on (its sampling.json): grid "
                                         "(diffusers' LCMScheduler) or refine (after the first step, low noise only).")
@click.option("--renoise", "sampling_renoise", type=click.Choice(RENOISE), default=None, show_default="fresh",
              help="Re-noising the exported LCM samples with by default (its sampling.json; `lcm generate --renoise`): "
                   "fresh (LCM Algorithm 3) or keep-means. Full UNet only.")
@click.option("--validate-every", type=click.IntRange(0, 10**7), default=500, help="Validation grid every N steps (0: off).")
@lora_rank_options("LCM-LoRA: train a rank-RANK LoRA on the teacher's UNet (paper 64; 16 for the tiny teacher).",
                   "RANK (scale 1)", "LoRA alpha (scale alpha / RANK).")
@_run_options
def distill(teacher, out, max_steps, lr, lr_schedule, min_lr_ratio, grad_clip, resume, max_minutes, num_data,
            data_dir, init_student, validate_every, checkpoint_every, lora_rank, lora_alpha, proportion_empty_prompts,
            mixed_precision, gradient_accumulation, optimizer, sampling_schedule, sampling_renoise, stage,
            guided_teacher, **lcd):
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
      lcm distill --stage guidance --out runs/guided --max-steps 4000      # then:
      lcm distill --init-student runs/guided --guided-teacher runs/guided --out runs/lcm-g
      ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
          -m latentcm.cli distill --out runs/lcm2      # two CPU processes (gloo)
    """
    from dataclasses import asdict

    from ..training import recipes
    from ..training.data.shards import is_shard_spec

    _torch_threads()
    lora = _lora_config(lora_rank, lora_alpha, lcd["seed"])
    check_full_unet_only(lora, lcd["student_ema"], lcd["cond_proj_lr_scale"], lcd["cond_proj_inputs"], init_student,
                         lcd["omega_zero_share"], lcd["low_w_skip"], sampling_renoise)
    check_stage(stage, lora, guided_teacher)
    recipe = "distill-guidance" if stage == "guidance" else "distill-lora" if lora else "distill"
    shards = data_dir if data_dir and is_shard_spec(data_dir) else None
    check_guidance_mode(lcd["guidance_mode"], lcd["omega_min"], lcd["omega_max"], lora, stage)
    cfg = recipes.lcd_config(recipe, omega_min=lcd.pop("omega_min"), omega_max=lcd.pop("omega_max"),
                             ema_decay=lcd.pop("ema"), empty_prompt_share=0.0 if shards else proportion_empty_prompts,
                             **lcd)
    memory = dict(mixed_precision=mixed_precision, gradient_accumulation=gradient_accumulation, optimizer=optimizer)
    loop_cfg = _loop_config(max_steps, lr, validate_every, checkpoint_every, max_minutes, memory,
                            {"lcd": asdict(cfg), **({"lora": asdict(lora)} if lora else {})},
                            schedule=lr_schedule, min_lr_ratio=min_lr_ratio, grad_clip=grad_clip)
    job = recipes.Job(registry.resolve(teacher), Path(out), loop_cfg, lcd=cfg, lora=lora,
                      data_dir=Path(data_dir) if data_dir and not shards else None, num_data=num_data, resume=resume,
                      data_shards=shards, shard_options={"proportion_empty_prompts": shard_share(proportion_empty_prompts, cfg)},
                      init_student=registry.resolve(init_student) if init_student else None,
                      guided_teacher=registry.resolve(guided_teacher) if guided_teacher else None,
                      sampling_schedule=sampling_schedule, sampling_renoise=sampling_renoise,
                      command=_command_line(click.get_current_context()))
    result = recipes.run(recipe, job)
    click.echo(_stopped(result.folder, result.steps))


@cli.command()
@click.option("--model", default="lcm", metavar="NAME|DIR", help="The LCM to adapt.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Image folder: metadata.jsonl (file_name, text) or <image>.txt captions.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; receives the LCM folder.")
@click.option("--skip", type=click.IntRange(1, 1000), default=None, metavar="K",  # 1000: k at most T
              help="Skipping interval k [default: the LCM's own grid, T // original_inference_steps].")
@click.option("--omega-min", type=FiniteRange(0, 50), default=OMEGA_RANGE[0], help="Lowest paper guidance w (g = 1 + w).")
@click.option("--omega-max", type=FiniteRange(0, 50), default=OMEGA_RANGE[1], help="Highest paper guidance w.")
@click.option("--ema", type=FiniteRange(0, 1, max_open=True), default=0.95, help="EMA rate mu of the target.")
@click.option("--loss", type=click.Choice(["l2", "huber"]), default="huber", help="Distance d (huber: pseudo-Huber).")
@click.option("--max-steps", type=click.IntRange(1, 10**7), default=1000, help="Optimizer steps.")
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), default=5e-5, help="AdamW learning rate (constant).")
@click.option("--validate-every", type=click.IntRange(0, 10**7), default=250, help="Validation grid every N steps (0: off).")
@click.option("--schedule", "sampling_schedule", type=click.Choice(TIMESTEP_SCHEDULES), default=None,
              show_default="the source LCM's", help="Timestep schedule the fine-tuned LCM samples on (its "
                                                  "sampling.json): grid or refine.")
@click.option("--renoise", "sampling_renoise", type=click.Choice(RENOISE), default=None,
              show_default="the source LCM's", help="Re-noising the fine-tuned LCM samples with by default (its "
                                                  "sampling.json): fresh or keep-means.")
@click.option("--max-timestep", type=click.IntRange(0, 100000), default=499,
              help="Train only grid points t <= this: adapt the low-noise end (texture, style) and leave the "
                   "high-noise end (layout, attributes) alone; the number of train timesteps - 1 trains all.")
@_run_options
def finetune(model, data_dir, out, skip, ema, max_steps, lr, resume, max_minutes, validate_every, checkpoint_every,
             mixed_precision, gradient_accumulation, optimizer, sampling_schedule, sampling_renoise, **lcd):
    """Latent Consistency Fine-tuning (LCF): adapt an LCM to your image-caption folder, no teacher needed.

    Unreadable images and images without a caption are skipped, counted and reported before training.
    OUT ends up a LatentConsistencyModelPipeline folder (plus checkpoints/, metrics.csv, previews/).

    \b
    Example:
      lcm world export data/striped --style striped --count 4000
      lcm finetune --model lcm --data data/striped --out runs/lcf --max-steps 1000
    """
    from dataclasses import asdict

    from ..training import recipes

    _torch_threads()
    model_dir = registry.resolve(model)
    k = skip if skip is not None else recipes.lcm_skip(recipes.load_source(model_dir, "lcm"))
    cfg = recipes.lcd_config("finetune", skip=k, ema_decay=ema, **lcd)
    memory = dict(mixed_precision=mixed_precision, gradient_accumulation=gradient_accumulation, optimizer=optimizer)
    loop_cfg = _loop_config(max_steps, lr, validate_every, checkpoint_every, max_minutes, memory,
                            {"lcf": asdict(cfg)}, schedule="constant")
    job = recipes.Job(model_dir, Path(out), loop_cfg, lcd=cfg, data_dir=Path(data_dir), resume=resume,
                      sampling_schedule=sampling_schedule, sampling_renoise=sampling_renoise,
                      command=_command_line(click.get_current_context()), on_data=_echo_report)
    result = recipes.run("finetune", job)
    click.echo(_stopped(result.folder, result.steps))


def _echo_report(report) -> None:
    """What the data folder gave, printed before training: loaded and skipped, the first few names per reason."""
    click.echo(report.summary())
    for reason, names in sorted(report.skipped.items()):
        click.echo(f"  {reason}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else ""))


@cli.command("finetune-teacher")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Diffusion teacher to fine-tune.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False), help="Image folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder; becomes a teacher folder.")
@click.option("--max-steps", type=click.IntRange(1, 10**7), default=1000)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32)
@click.option("--lr", type=FiniteRange(0, 1, min_open=True), default=1e-4, help="AdamW learning rate (constant).")
@seed_option()
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT.")
@click.option("--max-minutes", type=FiniteRange(0.1, None), default=None, help="Stop cleanly after this long.")
@lora_rank_options("Train only a LoRA adapter of this rank: OUT becomes a style-LoRA folder.", "RANK",
                   "LoRA alpha (scale alpha / rank).")
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
    from ..training import recipes
    from ..training.loop import LoopConfig

    _torch_threads()
    loop_cfg = LoopConfig(max_steps=max_steps, lr=lr, warmup=0, schedule="constant", max_minutes=max_minutes)
    job = recipes.Job(registry.resolve(teacher), Path(out), loop_cfg, lora=_lora_config(lora_rank, lora_alpha, seed),
                      data_dir=Path(data_dir), diffusion={"batch_size": batch_size, "seed": seed}, resume=resume,
                      command=_command_line(click.get_current_context()), on_data=_echo_report)
    result = recipes.run("finetune-teacher", job)
    click.echo(_stopped(result.folder, result.steps))
