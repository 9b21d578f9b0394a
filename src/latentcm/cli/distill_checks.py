"""The option combinations ``lcm distill`` refuses (each a one-line ``UserError``), and the shard caption share."""
from __future__ import annotations

import click

from .options import UserError


# options of LCD that guidance distillation has no use for (no solver, grid, target or sampling settings)
LCD_ONLY = ("solver", "skip", "ema", "guidance_max_t", "sampling_schedule", "sampling_renoise", "low_w_skip",
            "low_w_max", "noise_start_share", "ode_start_share", "ode_start_steps", "ode_pair_share",
            "ode_pair_steps", "ode_pair_starts")


def check_stage(stage: str, lora, guided_teacher) -> None:
    """Refuse options the chosen stage does not use, rather than ignore them."""
    if guided_teacher and lora:
        raise UserError("--guided-teacher is for full-UNet distillation; LCM-LoRA's teacher is the base UNet")
    if stage != "guidance":
        return
    ctx = click.get_current_context()
    given = [name for name in LCD_ONLY if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if lora or guided_teacher or given:
        flag = "--lora" if lora else "--guided-teacher" if guided_teacher else "--" + given[0].replace("_", "-")
        flag = flag.replace("--sampling-", "--")  # --schedule, --renoise
        raise UserError(f"{flag} is an LCD option; --stage guidance distils the teacher's CFG output (no solver, "
                        "grid, target network or LoRA)")


def shard_share(given: float | None, cfg) -> float:
    """Shards drop captions as they stream: the given share, else the real-CFG mode's default, else none."""
    from ..training.recipes import CFG_MODE_DEFAULTS

    return given if given is not None else CFG_MODE_DEFAULTS["empty_prompt_share"] if cfg.guidance_mode == "cfg" else 0.0


def check_guidance_mode(mode: str, omega_min, omega_max, lora, stage: str) -> None:
    """The real-CFG mode distils the unguided ODE of a full UNet: no w range, no LoRA, no guidance stage."""
    if mode != "cfg":
        return
    if omega_min is not None or omega_max is not None:
        raise UserError("--guidance-mode cfg distils the unguided ODE (w = 0): it takes no --omega-min / --omega-max")
    if lora or stage != "consistency":
        raise UserError("--guidance-mode cfg is for full-UNet consistency distillation (not --lora or --stage guidance)")


def check_full_unet_only(lora, student_ema, cond_proj_lr_scale, cond_proj_inputs, init_student,
                         omega_zero_share: float = 0.0, low_w_skip: int | None = None,
                         renoise: str | None = None) -> None:
    """Refuse the full-UNet options of distill together with --lora."""
    if lora and renoise is not None:
        raise UserError("--renoise is written into a full LCM's sampling.json; an LCM-LoRA folder carries none")
    if lora and student_ema:
        raise UserError("--student-ema is for full-UNet distillation; with --lora the adapter's --ema is the target")
    if lora and cond_proj_lr_scale != 1.0:
        raise UserError("--cond-proj-lr-scale is for full-UNet distillation; LCM-LoRA has no w projection")
    if lora and cond_proj_inputs != "all":
        raise UserError("--cond-proj-inputs is for full-UNet distillation; LCM-LoRA has no w projection")
    if lora and (omega_zero_share or low_w_skip):
        option = "--omega-zero-share" if omega_zero_share else "--low-w-skip"
        raise UserError(f"{option} needs a w input; LCM-LoRA is distilled at one fixed w")
    if lora and init_student:
        raise UserError("--init-student is for full-UNet distillation; LCM-LoRA trains an adapter on the teacher")
