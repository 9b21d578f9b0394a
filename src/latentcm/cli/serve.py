"""Commands that hand a model to others: ``lcm serve`` (web demo and HTTP API) and ``lcm export``."""
from __future__ import annotations

import click

from .. import registry
from .app import cli
from .options import FiniteRange, UserError


@cli.command("export")
@click.option("--model", default="lcm", metavar="NAME|DIR", help="Shipped LCM name or LCM folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder for the pipeline.")
@click.option("--fp16", is_flag=True, help='Also write float16 weights (diffusers variant="fp16").')
@click.option("--single-file", is_flag=True,
              help="Also write OUT/<name>.safetensors: all weights in the original Stable Diffusion checkpoint layout "
                   "(the model's default guidance baked in).")
@click.option("--base-model", default=None, metavar="TEXT",
              show_default="the source card's base_model, else its folder name", help="Model card base_model.")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "onnx", "openvino"]), default="diffusers",
              help="onnx / openvino: the folder optimum's ORT / OV LatentConsistencyModelPipeline loads "
                   "(lcm generate --runtime onnx|openvino runs it too).")
def export_model(model, out, fp16, single_file, base_model, fmt):
    """Export an LCM as a complete diffusers LatentConsistencyModelPipeline folder with a model card.

    The card's YAML front matter names library_name, base_model, tags, pipeline_tag and the
    recommended 4 steps at the model's default guidance (its sampling.json; else 8.5). Prints each step
    written (stderr), then the folder.

    --single-file writes the layout A1111, ComfyUI and diffusers' from_single_file read. It has no
    place for the LCM's guidance embedding, so that guidance is baked into the UNet; load it offline
    with the exported folder as config and sample with guidance_scale=1.0:

    \b
      StableDiffusionPipeline.from_single_file("OUT/<name>.safetensors", config="OUT",
          local_files_only=True, time_cond_proj_dim=None)

    \b
    Examples:
      lcm export --model lcm --out release/lcm --fp16
      lcm export --model runs/lcm --out release/my-lcm --single-file --base-model my-org/my-teacher
      lcm export --model lcm --out release/lcm-onnx --format onnx
    """
    from ..export.release import export_release

    if fmt != "diffusers":
        return _export_runtime(model, out, fmt, fp16=fp16, single_file=single_file)

    folder = export_release(registry.resolve(model), out, fp16=fp16, single_file=single_file, base_model=base_model,
                            progress=lambda line: click.echo(line, err=True))
    files = [f for f in folder.rglob("*") if f.is_file()]
    extras = [what for what, on in (("float16 variant", fp16), ("single file", single_file)) if on]
    click.echo(f"wrote a LatentConsistencyModelPipeline folder{' with ' + ' and '.join(extras) if extras else ''}: "
               f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB", err=True)
    click.echo(str(folder))


def _export_runtime(model: str, out: str, fmt: str, **flags) -> None:
    """lcm export --format onnx|openvino: the exported folder's path, with one progress line per network."""
    from ..export.onnx import export_onnx

    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    if given:
        raise UserError(f"{' and '.join(given)}: only with --format diffusers, not --format {fmt}")
    folder = export_onnx(registry.resolve(model), out, fmt=fmt, progress=lambda line: click.echo(line, err=True))
    files = [f for f in folder.rglob("*") if f.is_file()]
    click.echo(f"wrote an {fmt} LatentConsistencyModelPipeline folder: {len(files)} files, "
               f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB", err=True)
    click.echo(str(folder))


def _registered_loras(specs: tuple[str, ...]) -> dict[str, str]:
    """--lora NAME=PATH, repeated -> {NAME: PATH}."""
    registered = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora takes NAME=PATH, got {spec!r}")
        registered[name] = path
    return registered


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
              help="channels_last + torch.compile of the UNets: ~40 s per batch size on first use; speed against "
                   "diffusers in reports/serve/bench_sampling.md.")
@click.option("--no-ui", is_flag=True, help="Serve the HTTP/JSON API and /health only.")
@click.option("--runtime", type=click.Choice(["torch", "onnx", "openvino"]), default="torch",
              help="The LCM's runtime: torch weights, or a folder lcm export --format onnx|openvino wrote (--lcm).")
def serve(host, port, lcm_model, teacher, loras, max_batch, batch_window_ms, max_queue, dtype, compile_unet, no_ui,
          runtime):
    """Serve the LCM as a web demo (gradio, at /) and an HTTP/JSON API that batches concurrent requests.

    POST /api/generate takes JSON (prompt, steps, guidance, seed, num_images, height, width, gamma,
    loras, init_image as base64, strength, negative_prompt, renoise) and answers PNGs as base64 with timings;
    GET /health. guidance defaults to the served LCM's own g (its sampling.json; the shipped LCM's 2);
    negative_prompt works for the teacher and for an LCM that takes one (the shipped LCM does).

    \b
    Example:
      lcm serve --port 7860 --lora lcm-lora=runs/lcm-lora
    """
    registered = _registered_loras(loras)
    try:
        from ..serve.app import run
        from ..serve.service import ServeConfig

        config = ServeConfig(lcm=lcm_model, teacher=None if teacher == "none" else teacher, loras=registered,
                             max_batch=max_batch, window_ms=batch_window_ms, max_queue=max_queue, dtype=dtype,
                             compile=compile_unet, runtime=runtime)
        run(config, host=host, port=port, ui=not no_ui, ready=lambda url: click.echo(f"serving {url}", err=True))
    except ImportError as exc:
        raise UserError(f"lcm serve needs gradio ({exc.name} is missing): pip install 'latentcm[serve]'") from None
