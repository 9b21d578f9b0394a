"""What the ``lcm`` commands share: the one-line error, typed options, list parsers, option groups and the
mapping from library parameter names to flags.

Nothing here imports torch at import time: ``lcm --help`` and ``lcm models`` stay quick.
"""
from __future__ import annotations

import math
import re
import shlex

import click

from .. import registry
from ..defaults import LCM_SAMPLER, TEACHER_SAMPLERS
from ..errors import one_line

GENERATE_SAMPLERS = (*TEACHER_SAMPLERS, LCM_SAMPLER)
REFERENCES = ("prompt-scenes", "independent")  # real-image sets FID / KID compare with
SEED_MAX = 2**31 - 1

# Library parameter names -> the flags that set them (name with '-' for '_'): library errors speak of
# parameters, the CLI of flags. The names are SamplingOptions' fields (not imported: that would load torch).
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "sampler", "steps", "guidance", "gamma", "guidance_max_t", "timesteps", "schedule", "strength", "height",
    "width", "negative_prompt", "renoise")}

# Flags of diffusers' training scripts (train_lcm_distill_*.py, train_text_to_image*.py) -> ours, first one the
# command has; a flag that is ours with '_' for '-' is matched without a row here.
DIFFUSERS_FLAGS = {
    "--output_dir": ("--out",), "--pretrained_teacher_model": ("--teacher",),
    "--pretrained_model_name_or_path": ("--teacher", "--model"), "--train_data_dir": ("--data",),
    "--train_shards_path_or_url": ("--data",), "--dataset_name": ("--data",),
    "--max_train_steps": ("--max-steps",), "--num_train_steps": ("--max-steps",),
    "--learning_rate": ("--lr",), "--train_batch_size": ("--batch-size",),
    "--gradient_accumulation_steps": ("--gradient-accumulation",), "--checkpointing_steps": ("--checkpoint-every",),
    "--resume_from_checkpoint": ("--resume",), "--validation_steps": ("--validate-every",),
    "--lr_scheduler": ("--lr-schedule",), "--max_grad_norm": ("--grad-clip",), "--ema_decay": ("--ema",),
    "--loss_type": ("--loss",), "--lora_rank": ("--lora",), "--lora_alpha": ("--lora-alpha",),
    "--w_min": ("--omega-min",), "--w_max": ("--omega-max",), "--use_8bit_adam": ("--optimizer adamw8bit",),
    "--unet_time_cond_proj_dim": ("--time-cond-proj-dim",), "--num_inference_steps": ("--steps",),
    "--guidance_scale": ("--guidance",),
}


def diffusers_hint(exc: click.NoSuchOption) -> str | None:
    """"lcm distill takes --out, not --output_dir" for a diffusers-style flag the command has an equivalent of."""
    ctx, name = exc.ctx, exc.option_name
    if ctx is None or not name.startswith("--"):
        return None
    have = {opt for param in ctx.command.params for opt in param.opts}
    for flag in (*DIFFUSERS_FLAGS.get(name, ()), name.replace("_", "-")):
        if flag.split()[0] in have and flag != name:
            return f"{ctx.command_path} takes {flag}, not {name}"
    if name == "--resolution" and "--height" not in have:
        return f"{ctx.command_path} has no --resolution: it trains at the model's own size"
    return None


class UserError(click.ClickException):
    exit_code = 2


class FiniteRange(click.FloatRange):
    """A float option in a range that also refuses NaN and +-inf (NaN passes every comparison)."""

    name = "float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def flag_error(err: Exception) -> UserError:
    """A library error (ModelError, ValueError) that names a parameter, as a UserError naming its flag.

    The parameter is ``err.param`` when the error carries one, else a parameter name the message starts
    with or quotes ("steps must be ...", "'guidance' ..."); a message naming none is kept as it is."""
    text = one_line(err)
    name = getattr(err, "param", None)
    if name in FLAGS:
        flag = FLAGS[name]
        return UserError(text if flag in text else f"{flag}: {text}")
    names = "|".join(sorted(FLAGS, key=len, reverse=True))
    text = re.sub(rf"^({names})\b(?!-)", lambda m: FLAGS[m.group(1)], text)
    text = re.sub(rf"([`'\"])({names})\1", lambda m: FLAGS[m.group(2)], text)
    identifiers = "|".join(n for n in FLAGS if "_" in n)  # negative_prompt, guidance_max_t: never plain words
    text = re.sub(rf"(?<![-\w])({identifiers})\b", lambda m: FLAGS[m.group(1)], text)
    return UserError(text)


def default_model() -> str:
    """The shipped LCM when this installation has one, else the shipped teacher."""
    return "lcm" if "lcm" in registry.shipped_models() else "teacher"


def _torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise UserError("the prompt is empty; describe the image, e.g. \"a red circle on a blue background\"")


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


def _step_list(text: str, name: str) -> list[int]:
    """Comma-separated step counts in 1..T."""
    from ..schedules import TRAIN_TIMESTEPS

    return _int_list(text, 1, TRAIN_TIMESTEPS, name)


def _command_line(ctx: click.Context, leave_out: tuple[str, ...] = ("resume", "max_minutes")) -> str:
    """The command with every option spelled out (for model cards); run-control options left out."""
    parts = ["lcm", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None or value is False:
            continue
        parts += [param.opts[0]] if value is True else [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def _stopped(folder, steps: int) -> str:
    """What a training command prints: the exported folder, or where a time limit stopped it."""
    return str(folder) if folder else f"stopped at step {steps} (time limit); continue with --resume"


def _apply(command, options: list):
    for option in reversed(options):
        command = option(command)
    return command


def seed_option(help: str | None = None):
    return click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, help=help)


def reference_option(help: str):
    return click.option("--reference", type=click.Choice(REFERENCES), default="prompt-scenes", help=help)


def judge_option(help: str):
    return click.option("--judge", "judge_dir", default="judge", metavar="NAME|DIR", help=help)


def lora_rank_options(help: str, alpha_default: str, alpha_help: str):
    """--lora RANK and --lora-alpha A of the training commands (an adapter instead of the full UNet)."""
    return lambda command: _apply(command, [
        click.option("--lora", "lora_rank", type=click.IntRange(1, 4096), default=None, metavar="RANK", help=help),
        click.option("--lora-alpha", type=FiniteRange(0, None, min_open=True), default=None,
                     show_default=alpha_default, help=alpha_help),
    ])


def _lora_config(rank: int | None, alpha: float | None, seed: int):
    """--lora RANK [--lora-alpha A] -> a LoRAConfig, or None without --lora."""
    if rank is None:
        if alpha is not None:
            raise UserError("--lora-alpha needs --lora RANK")
        return None
    from ..models.lora import LoRAConfig

    return LoRAConfig(rank=rank, alpha=alpha, seed=seed)


def _loop_config(max_steps, lr, validate_every, checkpoint_every, max_minutes, memory, meta, **schedule):
    """The LoopConfig of distill and finetune (no warmup; ``schedule``: lr schedule keywords)."""
    from ..training.loop import LoopConfig

    return LoopConfig(max_steps=max_steps, lr=lr, warmup=0, checkpoint_every=checkpoint_every,
                      preview_every=validate_every, max_minutes=max_minutes, **schedule, **memory, extra_meta=meta)


def _run_options(command):
    """Options the consistency-training commands (distill, finetune) share."""
    return _apply(command, [
        click.option("--huber-c", type=FiniteRange(0, 1, min_open=True), default=0.001, help="c of pseudo-Huber."),
        click.option("--student-ema", type=FiniteRange(0, 1, max_open=True), default=0.0, metavar="DECAY",
                     help="Also keep a slow EMA of the student (e.g. 0.999) and export it instead of the online "
                          "weights; 0: off. Full UNet only (not --lora)."),
        click.option("--batch-size", type=click.IntRange(1, 4096), default=16, help="Batch per process."),
        seed_option("Seed of the training batches."),
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
    ])
