"""Sampling commands: ``lcm generate``, ``lcm compare`` and ``lcm models``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .. import registry
from ..defaults import COMPARE_TEACHER_STEPS, LCM_GUIDANCE, LCM_STEPS, TEACHER_GUIDANCE, TEACHER_STEPS
from ..defaults import RENOISE, TIMESTEP_SCHEDULES
from .app import cli
from .options import (GENERATE_SAMPLERS, FiniteRange, UserError, _check_prompt, _int_list, default_model, flag_error,
                      seed_option)


@cli.command()
@click.argument("prompt")
@click.option("--model", default=default_model, show_default="lcm if shipped, else teacher", metavar="NAME|DIR",
              help="Shipped model name or diffusers folder (teacher or LCM).")
@click.option("--sampler", type=click.Choice(GENERATE_SAMPLERS), default=None,
              show_default="lcm for an LCM, ddim for a teacher", help="lcm for an LCM folder, else a teacher sampler.")
@click.option("--steps", type=click.IntRange(1, 1000), default=None,  # 1000: at most T steps
              show_default=f"{LCM_STEPS} for an LCM, {TEACHER_STEPS} for a teacher",
              help="Sampling steps (LCM: 1-8 usual, at most its original_inference_steps).")
@click.option("--guidance", type=FiniteRange(0, 50), default=None,
              show_default=f"an LCM's own (its sampling.json; else {LCM_GUIDANCE}), "
                           f"{TEACHER_GUIDANCE} for a teacher",
              help="Guidance scale g (1 = none); an LCM is conditioned on w = g - 1. An LCM whose sampling.json has "
                   "an unguided entry (the shipped one) takes its first step with its unguided first-step LoRA "
                   "wherever it reads w = 0 (g = 1, or a negative prompt), and at g = 1 without a negative prompt "
                   "re-noises as that entry says.")
@seed_option("Seed of the first image.")
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
@click.option("--negative-prompt", default=None, metavar="TEXT",
              help="What to steer away from (CFG's unconditional branch, instead of the empty prompt): teacher "
                   "samplers, a real-CFG LCM (lcm distill --guidance-mode cfg), and an LCM with a w input distilled "
                   "from w = 0 (--omega-min 0: real CFG at w = 0, two passes a step, g default 2). Other LCMs with "
                   "a w input refuse it: their guidance is distilled into that input, with no such branch.")
@click.option("--schedule", type=click.Choice(TIMESTEP_SCHEDULES), default=None, show_default="the model's",
              help="LCM: how --steps timesteps are picked: grid (diffusers' LCMScheduler) or refine (after the "
                   "first step, every step at low noise); the shipped LCM's sampling.json asks for refine.")
@click.option("--renoise", type=click.Choice(RENOISE), default=None,
              show_default="the model's (shipped LCM: fresh; keep-means at g = 1)",
              help="LCM: the noise added between steps: fresh (LCM Algorithm 3, as diffusers' LCMScheduler) or "
                   "keep-means (each channel's mean taken from the step's own noise estimate, so the later steps "
                   "keep the first step's background; docs/diagnosis-guidance.md).")
@click.option("--runtime", type=click.Choice(["torch", "onnx", "openvino"]), default="torch",
              help="onnx / openvino: run a folder written by lcm export --format onnx|openvino (same sampler).")
def generate(prompt, model, loras, num_images, seed, out, runtime, **options):
    """Generate an image grid from a text prompt.

    Image i uses seed SEED+i, so an image does not depend on --num-images. An LCM
    folder samples with --sampler lcm (one UNet pass per step), a teacher with CFG.

    \b
    Examples:
      lcm generate "a large red circle on a blue background" --out red.png
      lcm generate "a large red circle on a blue background" --model teacher --steps 50 --out red50.png
      lcm generate "a large red circle on a blue background" --model teacher --lora runs/lcm-lora --out lora.png
      lcm generate "a large red circle on a green background" --init-image red.png --strength 0.5 --out i2i.png
      lcm generate "a large red circle on a blue background" --model lcm-onnx --runtime onnx --out onnx.png
    """
    from ..errors import ModelError
    from ..images import save_grid

    _check_prompt(prompt)
    sampling = _sampling_options(loras=loras, **options)
    bundle = _load(model, loras, runtime)
    prompts, seeds = [prompt] * num_images, [seed + i for i in range(num_images)]
    try:
        images = (bundle.img2img(prompts, seeds, options["init_image"], options=sampling) if sampling.img2img
                  else bundle.generate(prompts, seeds, options=sampling))
    except (ModelError, ValueError) as err:  # the model's own limits (steps, sampler, a schedule it refuses)
        raise flag_error(err) from None
    click.echo(str(save_grid(images, Path(out), cols=min(8, num_images))))


def _load(model: str, loras: tuple[str, ...], runtime: str):
    """The model as a Bundle: torch weights (with LoRAs), or an exported folder's graphs on ``runtime``."""
    from ..bundle import Bundle
    from ..bundle.runtime import is_export, load_runtime
    from ..models.lora import parse_lora_spec

    if runtime == "torch":
        if is_export(registry.resolve(model)):
            raise UserError(f"{model} is an ONNX / OpenVINO export: add --runtime onnx (or openvino)")
        return Bundle.load(registry.resolve(model), loras=[parse_lora_spec(spec) for spec in loras])
    if loras:
        raise UserError("--lora needs --runtime torch (an export has its LoRAs fused, or none)")
    return load_runtime(registry.resolve(model), runtime)


def _sampling_options(loras, init_image, strength, timesteps_text, **given):
    """generate's options as one SamplingOptions (its rules, with flags for parameters); img2img takes
    IMG2IMG_STRENGTH unless --strength says otherwise."""
    from ..defaults import IMG2IMG_STRENGTH
    from ..errors import ModelError
    from ..sampling.options import SamplingOptions

    if strength is not None and init_image is None:
        raise UserError("--strength needs --init-image (img2img)")
    timesteps = _int_list(timesteps_text, 0, 999999, "--timesteps") if timesteps_text else None
    if init_image is not None and strength is None:
        strength = IMG2IMG_STRENGTH
    try:
        options = SamplingOptions(timesteps=timesteps, strength=strength, **given)
        if loras:
            options.check_lora()
    except ModelError as err:
        raise flag_error(err) from None
    return options


def _load_pair(lcm_model: str, teacher: str) -> tuple[dict, dict]:
    """({"lcm": folder, "teacher": folder}, the loaded Bundles); UserError when the kinds are swapped."""
    from ..bundle import Bundle

    dirs = {"lcm": registry.resolve(lcm_model), "teacher": registry.resolve(teacher)}
    bundles = {name: Bundle.load(folder) for name, folder in dirs.items()}
    for name, bundle in bundles.items():
        if bundle.is_lcm != (name == "lcm"):
            kind = "an LCM" if bundle.is_lcm else "a diffusion teacher"
            raise UserError(f"--{name} {dirs[name]} is {kind}; swap --lcm and --teacher?")
    return dirs, bundles


@cli.command(help=f"""One PNG with labelled rows: LCM 1, 2, 4 steps (at its own default g, from its sampling.json)
    and the teacher's DDIM {COMPARE_TEACHER_STEPS} steps (CFG {TEACHER_GUIDANCE}), same seeds.

    Prints the PNG's path, then one line per row with its measured seconds per image.

    \b
    Example:
      lcm compare "a small green triangle on a white background" --out compare.png
    """)
@click.argument("prompt")
@click.option("--lcm", "lcm_model", default="lcm", metavar="NAME|DIR", help="Shipped LCM name or LCM folder.")
@click.option("--teacher", default="teacher", metavar="NAME|DIR", help="Shipped teacher name or teacher folder.")
@click.option("--num-images", type=click.IntRange(1, 64), default=4, help="Images per row (seeds SEED..SEED+K-1).")
@seed_option("Seed of the first image.")
@click.option("--out", type=click.Path(dir_okay=False), default="samples/compare.png", help="Output PNG.")
def compare(prompt, lcm_model, teacher, num_images, seed, out):
    from ..evaluation.compare import compare as compare_rows

    _check_prompt(prompt)
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
