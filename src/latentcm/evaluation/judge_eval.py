"""Quality of a teacher measured by the independent judge on held-out prompts."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import world
from ..models.judge import Judge

SCORED = ("colour", "background", "shape", "size", "position")


def heldout_prompts(count: int, seed: int = 99) -> list[tuple[str, dict[str, str]]]:
    """Held-out captions (held-out templates and attribute triples) with what they ask for."""
    return [(s.text, world.parse_caption(s.text)) for s in world.iter_samples(seed, count, "heldout")]


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


def evaluate_teacher(bundle, judge: Judge, num_samples: int = 256, sampler: str = "ddim", steps: int = 50,
                     guidance: float = 7.5, batch_size: int = 32, seed: int = 0) -> dict:
    """Generate one image per held-out prompt and score it with the judge."""
    prompts = heldout_prompts(num_samples)
    images, t0 = [], time.time()
    for i in tqdm(range(0, num_samples, batch_size), desc=f"{sampler} {steps} steps"):
        chunk = prompts[i:i + batch_size]
        images.append(bundle.generate([p for p, _ in chunk], [seed + i + j for j in range(len(chunk))],
                                      sampler, steps, guidance))
    images = torch.cat(images)
    acc = attribute_accuracy(judge_images(judge, images), [w for _, w in prompts])
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "num_samples": num_samples,
            "accuracy": acc, "seconds": round(time.time() - t0, 1)}, images


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
    psnrs = []
    for i in range(0, count, batch_size):
        xb = x[i:i + batch_size]
        rec = vae.decode(vae.encode(xb).latent_dist.mode()).sample.clamp(-1, 1)
        rec8 = ((rec + 1) * 127.5).round()
        mse = (rec8 - (xb + 1) * 127.5).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(255.0 ** 2 / mse))
    return float(torch.cat(psnrs).mean())
