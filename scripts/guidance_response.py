"""Does a model respond to guidance? Mean per-pixel change between two guidance scales, LCM against teacher.

    python scripts/guidance_response.py --lcm lcm [--lcm runs/x/lcm-ckpt ...] [--teacher teacher]
                                        [--teacher-row ddim-trailing:50 ...]
                                        [--low 3 --high 8.5] [--steps 4] [--num-samples 128] [--out FILE]
                                        [--via-diffusers] [--cache runs/sweep/samples]

``--via-diffusers``: the LCM rows are sampled by diffusers' own pipeline for the folder
(``DiffusionPipeline.from_pretrained``: LatentConsistencyModelPipeline, or StableDiffusionPipeline + LCMScheduler
for a real-CFG LCM) on diffusers' default timesteps, the same initial latents at both scales. ``--cache``: the
prompts and seeds of ``lcm evaluate`` / ``lcm ablate guidance`` (held-out prompts, seed i for image i), and the
teacher rows read from (or written to) that evaluation sample cache, e.g. the guided ODE of ``lcm ablate guidance``
(``--teacher-row ddim-trailing:50``).

For each model: images of the same held-out prompts and seeds at guidance scales g_low and g_high
(paper w = g - 1), mean |x_high - x_low| in 0..255 units per pixel. The teacher runs DDIM at the same
step count with CFG (the target for a faithful few-step LCM: it should move at least half
as much as the teacher's DDIM-4). Each row's ratio to the first teacher row comes with a paired 95% percentile
bootstrap interval over the prompts (the same prompts and seeds in every row). Also prints a checkpoint's
w-projection norm beside its time embedding.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from latentcm import registry, world
from latentcm.bundle import Bundle
from latentcm.evaluation import intervals

RESAMPLES = 2000


def prompts(count: int) -> list[str]:
    return [s.text for s in world.iter_samples(99, count, "heldout")]


def change(bundle: Bundle, sampler: str, steps: int, low: float, high: float, texts: list[str], batch: int = 64,
           timesteps: list[int] | None = None) -> np.ndarray:
    """Per image of ``texts``: its mean absolute pixel change (0..255) between guidance ``low`` and ``high``."""
    out = []
    for i in range(0, len(texts), batch):
        part, seeds = texts[i:i + batch], list(range(i, i + min(batch, len(texts) - i)))
        a = bundle.generate(part, seeds, sampler, steps, low, timesteps=timesteps)
        b = bundle.generate(part, seeds, sampler, steps, high, timesteps=timesteps)
        out.append((a - b).abs().double().mean(dim=(1, 2, 3)).numpy() * 127.5)
    return np.concatenate(out)


def diffusers_change(folder: Path, steps: int, low: float, high: float, texts: list[str],
                     batch: int = 32) -> np.ndarray:
    """``change`` with diffusers' own pipeline for ``folder`` on its default timesteps (see the module docstring)."""
    from diffusers import DiffusionPipeline

    from latentcm.sampling.teacher import initial_latents

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    out = []
    for i in range(0, len(texts), batch):
        part = texts[i:i + batch]
        latents = initial_latents(list(range(i, i + len(part))), shape)
        pair = [pipe(part, num_inference_steps=steps, guidance_scale=g, latents=latents, output_type="np",
                     generator=torch.Generator().manual_seed(i), height=shape[1] * f, width=shape[2] * f).images
                for g in (low, high)]
        out.append(np.abs(pair[1].astype(np.float64) - pair[0]).mean(axis=(1, 2, 3)) * 255)
    return np.concatenate(out)


def cached_change(bundle: Bundle, sampler: str, steps: int, low: float, high: float, texts: list[str],
                  cache: Path) -> np.ndarray:
    """``change`` of a teacher row from the evaluation sample cache (generated there when absent)."""
    from latentcm.evaluation.generation import generate_cached
    from latentcm.evaluation.pipeline import Row

    a, b = (generate_cached(bundle, Row("teacher", sampler, steps, g), texts, 0, cache)[0].astype(np.float64)
            for g in (low, high))
    return np.abs(b - a).reshape(len(texts), -1).mean(axis=1)


def ratio_interval(moved: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES) -> list[float]:
    """95% percentile bootstrap interval of mean(moved) / mean(reference), the prompts resampled jointly (paired)."""
    counts = intervals.draw(len(moved), len(moved), resamples).prompts
    return [round(v, 4) for v in intervals.percentile_interval((counts @ moved) / (counts @ reference))]


def teacher_row(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if not steps.isdigit():
        sys.exit(f"error: --teacher-row wants SAMPLER:STEPS (e.g. ddim-trailing:50), got {text!r}")
    return sampler, int(steps)


def norms(bundle: Bundle) -> dict:
    emb = bundle.unet.time_embedding
    out = {"linear_1": float(emb.linear_1.weight.norm())}
    if getattr(emb, "cond_proj", None) is not None:
        out["cond_proj"] = float(emb.cond_proj.weight.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lcm", action="append", default=None, help="LCM name or folder (repeatable)")
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--low", type=float, default=3.0)
    ap.add_argument("--high", type=float, default=8.5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--teacher-row", action="append", default=None, metavar="SAMPLER:STEPS",
                    help="more teacher rows, e.g. ddim-trailing:50 (the LCM's guided-ODE ceiling); repeatable")
    ap.add_argument("--lcm-timesteps", default=None, metavar="T,T,...",
                    help="the LCMs' explicit schedule (as lcm generate --timesteps); --steps is then its length")
    ap.add_argument("--via-diffusers", action="store_true", help="LCM rows through diffusers' own pipeline")
    ap.add_argument("--cache", default=None, metavar="DIR", help="evaluation prompts; teacher rows from this cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cache and not args.teacher_row:
        sys.exit("error: --cache reads teacher rows given with --teacher-row (e.g. ddim-trailing:50)")
    timesteps = [int(t) for t in args.lcm_timesteps.split(",")] if args.lcm_timesteps else None
    if timesteps is not None and len(timesteps) != args.steps:
        sys.exit(f"error: --steps {args.steps} but {len(timesteps)} --lcm-timesteps")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.cache:
        from latentcm.evaluation.references import heldout_prompts

        texts = [p for p, _ in heldout_prompts(args.num_samples)]
    else:
        texts = prompts(args.num_samples)
    rows = []
    teacher = Bundle.load(registry.resolve(args.teacher))
    first = [] if args.cache else [("ddim", args.steps)]
    for sampler, steps in [*first, *map(teacher_row, args.teacher_row or [])]:  # ratio: the first
        moved = (cached_change(teacher, sampler, steps, args.low, args.high, texts, Path(args.cache)) if args.cache
                 else change(teacher, sampler, steps, args.low, args.high, texts))
        rows.append({"model": args.teacher, "sampler": sampler, "steps": steps, **norms(teacher), "change": moved})
    for name in args.lcm or ["lcm"]:
        b = Bundle.load(registry.resolve(name))
        rows.append({"model": name, "sampler": "lcm", "steps": args.steps, **norms(b),
                     **({"via": "diffusers, its default timesteps"} if args.via_diffusers else
                        {"timesteps": timesteps} if timesteps else {"schedule": b.timestep_schedule}),
                     "change": (diffusers_change(b.path, args.steps, args.low, args.high, texts) if args.via_diffusers
                                else change(b, "lcm", args.steps, args.low, args.high, texts, timesteps=timesteps))})
    ref = rows[0]["change"]
    for r in rows:
        moved = r.pop("change")
        r.update(change=float(moved.mean()), ratio_to_teacher=float(moved.mean() / ref.mean()),
                 ratio_ci=ratio_interval(moved, ref))
        print(f"{r['model']:40s} {r['sampler']:13s} {r['steps']:3d} change {r['change']:6.2f}/255  ratio "
              f"{r['ratio_to_teacher']:.3f} {r['ratio_ci']}  "
              + " ".join(f"|{k}| {v:.2f}" for k, v in r.items() if k in ("cond_proj", "linear_1")))
    result = {"low": args.low, "high": args.high, "steps": args.steps, "num_samples": args.num_samples,
              "command": " ".join(["python", *sys.argv]), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
