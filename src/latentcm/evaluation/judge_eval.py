"""Quality of a teacher or an LCM, measured by the independent judge on held-out prompts."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..images import vae_round_trip
from ..models.judge import Judge

SCORED = ("colour", "background", "shape", "size", "position")


def heldout_prompts(count: int, seed: int = 99, split: str = "heldout") -> list[tuple[str, dict[str, str]]]:
    """Held-out captions (held-out templates and attribute triples) with what they ask for."""
    return [(s.text, world.parse_caption(s.text)) for s in world.iter_samples(seed, count, split)]


def attribute_accuracy(predicted: list[dict[str, str]], wanted: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute: the share of images whose judged value equals the one the prompt named
    (only images whose prompt names that attribute count)."""
    out = {}
    for key in SCORED:
        hits = [p[key] == w[key] for p, w in zip(predicted, wanted) if key in w]
        if hits:
            out[key] = float(np.mean(hits))
    return out


def judge_images(judge: Judge, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
    preds: list[dict[str, str]] = []
    for i in range(0, len(images), batch_size):
        preds += judge.predict(images[i:i + batch_size])
    return preds


class _UNetCounter:
    """Counts the images a module's forward sees (UNet evaluations), via a forward pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.count += (args[0] if args else kwargs["sample"]).shape[0]

    def remove(self) -> None:
        self._handle.remove()


def evaluate(bundle, judge: Judge, sampler: str, steps: int, guidance: float, num_samples: int = 256,
             batch_size: int = 32, seed: int = 0, desc: str | None = None,
             split: str = "heldout") -> tuple[dict, torch.Tensor]:
    """Generate one image per held-out prompt with any (model, sampler, steps, guidance) and judge it.

    Image i uses prompt i of ``heldout_prompts(num_samples)`` and seed ``seed + i`` (independent of
    ``batch_size``). UNet evaluations are counted, not assumed (LCM: one per step; CFG teacher: two).

    Returns:
        (result, images): result has sampler, steps, guidance, num_samples, accuracy (attribute -> share),
        unet_evals_per_image, seconds (wall time of generation) and seconds_per_image; images [N, 3, H, W].
    """
    bundle.check_sampling(sampler, steps)
    prompts = heldout_prompts(num_samples, split=split)
    images, counter, t0 = [], _UNetCounter(bundle.unet), time.perf_counter()
    try:
        for i in tqdm(range(0, num_samples, batch_size), desc=desc or f"{sampler} {steps} steps"):
            chunk = prompts[i:i + batch_size]
            images.append(bundle.generate([p for p, _ in chunk], [seed + i + j for j in range(len(chunk))],
                                          sampler, steps, guidance).cpu())
    finally:
        counter.remove()
    seconds = time.perf_counter() - t0
    images = torch.cat(images)
    acc = attribute_accuracy(judge_images(judge, images), [w for _, w in prompts])
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "num_samples": num_samples,
            "split": split, "accuracy": acc, "unet_evals_per_image": counter.count / num_samples,
            "seconds": round(seconds, 2), "seconds_per_image": round(seconds / num_samples, 4)}, images


def evaluate_teacher(bundle, judge: Judge, num_samples: int = 256, sampler: str = "ddim", steps: int = 50,
                     guidance: float = 7.5, batch_size: int = 32, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """``evaluate`` with the teacher's argument order (kept for existing callers)."""
    return evaluate(bundle, judge, sampler, steps, guidance, num_samples, batch_size, seed)


# One row per (model, sampler, steps, guidance g) of the LCM-vs-teacher table (issue 3, "Must show").
LCM_TABLE_ROWS = (
    *(("lcm", "lcm", n, 8.5) for n in (1, 2, 4, 8)),
    *(("teacher", s, n, 7.5) for s in ("ddim", "dpm-solver++") for n in (1, 2, 4)),
    ("teacher", "ddim", 50, 7.5),
)


def evaluate_lcm_table(bundles: dict, judge: Judge, num_samples: int = 256, rows=LCM_TABLE_ROWS,
                       batch_size: int = 32, seed: int = 0) -> list[dict]:
    """Score every row (model name, sampler, steps, g) with the same prompts and seeds.

    Args:
        bundles: model name -> Bundle, e.g. {"lcm": ..., "teacher": ...}.
        rows: (model name, sampler, steps, guidance) tuples; default ``LCM_TABLE_ROWS``.

    Returns:
        One ``evaluate`` result per row, with "model" added.
    """
    out = []
    for model, sampler, steps, guidance in rows:
        result, _ = evaluate(bundles[model], judge, sampler, steps, guidance, num_samples, batch_size, seed,
                             desc=f"{model} {sampler} {steps} steps")
        out.append({"model": model, **result})
    return out


def markdown_table(results: list[dict]) -> str:
    """A Markdown table of ``evaluate_lcm_table`` results: accuracy in %, UNet evaluations, seconds."""
    head = ["model", "sampler", "steps", "guidance", *SCORED, "UNet evals / image", "seconds", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = [f"{100 * r['accuracy'][k]:.1f}" if k in r["accuracy"] else "-" for k in SCORED]
        cells = [r.get("model", "?"), r["sampler"], str(r["steps"]), f"{r['guidance']:g}", *acc,
                 f"{r['unet_evals_per_image']:g}", f"{r['seconds']:.1f}", f"{r['seconds_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def judge_on_real(judge: Judge, count: int = 1000, seed: int = 99) -> dict[str, float]:
    """The judge's own accuracy on real held-out images (its ceiling)."""
    samples = list(world.iter_samples(seed, count, "heldout"))
    x = torch.from_numpy(world.images_array(samples)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return attribute_accuracy(judge_images(judge, x), [s.scene.attributes() for s in samples])


@torch.no_grad()
def vae_psnr(vae, count: int = 512, seed: int = 99, batch_size: int = 128) -> float:
    """Mean reconstruction PSNR (dB, 8-bit images) on held-out world images."""
    samples = list(world.iter_samples(seed, count, "heldout"))
    x = torch.from_numpy(world.images_array(samples)).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec8 = ((vae_round_trip(vae, x, batch_size) + 1) * 127.5).round()
    mse = (rec8 - (x + 1) * 127.5).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())
