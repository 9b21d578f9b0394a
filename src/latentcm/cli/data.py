"""Data commands: ``lcm world export`` (the procedural shapes world as image folders or shards) and
``lcm prepare`` (encode images once into latent shards for ``lcm distill --data``)."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .. import registry
from .app import cli
from .options import UserError, seed_option


@cli.group("world")
def world_group():
    """The procedural shapes world."""


@world_group.command("export")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["train", "heldout", "paraphrase"]), default="train")
@click.option("--count", type=click.IntRange(1, 10**6), default=1000)
@seed_option()
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
    from .. import styles, world

    what = f"{count} {'striped ' if style == 'striped' else ''}{split} images (seed {seed})"
    if fmt == "shards":
        if style != "none":
            raise UserError("--format shards writes the plain world (--style none)")
        folder = world.export_shards(out, seed, count, split, shard_size)
        shards = -(-count // shard_size)
        what += f" as {shards} webdataset shard{'s' if shards > 1 else ''} of up to {shard_size} (png, txt, json)"
    elif style == "none":
        folder = world.export_imagefolder(out, seed, count, split)
        what += " as PNGs + metadata.jsonl (imagefolder)"
    elif split not in styles.STYLE_SPLITS:
        raise UserError(f"the striped set has splits {', '.join(styles.STYLE_SPLITS)}, not {split!r}")
    else:
        folder = styles.export_styled(out, seed, count, split)
        what += " as PNGs + metadata.jsonl (imagefolder)"
    click.echo(f"wrote {what}", err=True)
    click.echo(str(folder))


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
      ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m latentcm.cli prepare \\
          --data 'data/shards/{000000..000009}.tar' --out data/latents
      lcm distill --data 'data/latents/{000000..000009}.tar' --out runs/lcm-latents
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from ..bundle import Bundle
    from ..training.data import prepare as prep

    cfg = prep.PrepareConfig(text=text, dtype=dtype, shard_size=shard_size, batch_size=batch_size, min_size=min_size)
    bundle = Bundle.load(registry.resolve(model))
    if bundle.is_lcm:
        raise UserError(f"--model {bundle.path} is an LCM; prepare with the teacher you will distil")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    rank, world = state.process_index, state.num_processes
    if state.is_main_process and (warning := prep.launch_warning(os.environ, world)):
        click.echo(warning, err=True)
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
        if not summary["loaded"] and not summary["missing_units"]:
            prep.discard(Path(out), num_units)  # no empty shard is left behind as a finished unit
            raise UserError(f"no usable image in {data} (skipped: {skipped}); nothing written")
        click.echo(f"{summary['loaded']} samples in {num_units} latent shards ({done['skipped_existing']} kept from "
                   f"an earlier run by this process); skipped: {skipped}")
        if summary["missing_units"]:
            raise UserError(f"{len(summary['missing_units'])} shards are missing; rerun the same command to finish")
        click.echo(f"train with: lcm distill --teacher {model} --data '{summary['spec']}' --out runs/lcm")
