"""Side-by-side LCM vs teacher samples of one prompt: a labelled grid, one row per (model, sampler, steps)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..defaults import COMPARE_TEACHER_STEPS, LCM_GUIDANCE, LCM_SAMPLER, TEACHER_GUIDANCE
from ..images import to_uint8_grid
from .pipeline import Row  # the evaluation pipeline's row type (model, sampler, steps, guidance; .label)

LABEL_MARGIN = 150  # px of left margin that holds each row's label


def compare_rows(lcm_guidance: float = LCM_GUIDANCE) -> tuple[Row, ...]:
    """The LCM at 1, 2 and 4 steps at ``lcm_guidance`` (its own default g), then the teacher's DDIM with CFG."""
    return (*(Row("lcm", LCM_SAMPLER, n, lcm_guidance) for n in (1, 2, 4)),
            Row("teacher", "ddim", COMPARE_TEACHER_STEPS, TEACHER_GUIDANCE))


def timed_rows(bundles: dict, prompt: str, seeds: list[int],
               rows=None) -> list[tuple[Row, torch.Tensor, float]]:
    """Sample every row (None: ``compare_rows`` at the LCM's default g) with the same prompt and seeds.

    Returns:
        (row, images [K, 3, H, W] in [-1, 1], wall seconds per image of that row) per row.
    """
    out = []
    for row in rows or compare_rows(bundles["lcm"].defaults[2]):
        t0 = time.perf_counter()
        images = bundles[row.model].generate([prompt] * len(seeds), seeds, row.sampler, row.steps, row.guidance)
        out.append((row, images.cpu(), (time.perf_counter() - t0) / len(seeds)))
    return out


def labelled_grid(results: list[tuple[Row, torch.Tensor, float]]):
    """One PIL image: each row's images side by side, its label and s/image on a left margin."""
    from PIL import Image, ImageDraw, ImageFont

    strips = [to_uint8_grid(images, cols=len(images)) for _, images, _ in results]  # [H, K W, 3] each
    height, width = strips[0].shape[0], max(s.shape[1] for s in strips)
    canvas = Image.new("RGB", (LABEL_MARGIN + width, height * len(strips)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, ((row, _, sec), strip) in enumerate(zip(results, strips)):
        canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (LABEL_MARGIN, i * height))
        draw.multiline_text((4, i * height + 4), f"{row.label}\n{sec:.3f} s/image", fill="black", font=font)
    return canvas


def compare(bundles: dict, prompt: str, out: str | Path, num_images: int = 4, seed: int = 0,
            rows=None) -> tuple[Path, list[tuple[Row, float]]]:
    """Write the labelled comparison PNG of ``prompt`` (seeds seed..seed+K-1 in every row).

    Returns:
        (path, [(row, seconds per image)]).
    """
    results = timed_rows(bundles, prompt, [seed + i for i in range(num_images)], rows)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(results).save(path)
    return path, [(row, sec) for row, _, sec in results]
