"""Cached generation: the images of one row (model, sampler, steps, guidance) on a list of prompts.

Image i is seeded ``seed + i``, so a row does not depend on batch size; UNet evaluations are counted, not
assumed; the images are cached under ``OUT/samples/`` (a rerun with one more sampler samples only the new
rows), keyed by the model's weights, the row, the prompts and the seeds.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..defaults import LCM_SAMPLER
from ..files import atomic_path
from ..images import to_pixels

IMAGE_FORMATS = ("uint8", "float32")


class UNetCounter:
    """Counts the images a module's forward sees (UNet evaluations), via a forward pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.count += (args[0] if args else kwargs["sample"]).shape[0]

    def remove(self) -> None:
        self._handle.remove()


def _stamp(path) -> list:
    """Name, size and mtime of the safetensors in a folder (or of one file): retrained weights written
    into the same place are not mistaken for the old ones."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()]


def _sha(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _identity(bundle, row, prompts: list[str], seed: int, image_format: str) -> dict:
    """What made a cached file: the model folder and its weights, the LoRAs, the row, the prompts and seeds."""
    identity = {"model_path": str(bundle.path), "weights": _stamp(Path(bundle.path) / "unet"),
                "loras": [[p, w, _stamp(p)] for p, w in bundle.loras],
                "row": row.key, "num": len(prompts), "seed": seed, "prompts_sha": _sha(prompts)}
    if image_format != "uint8":
        identity["format"] = image_format
    if row.sampler == LCM_SAMPLER:  # the timesteps: the row's schedule, else the one the model folder asks for
        identity["schedule"] = row.schedule or getattr(bundle, "timestep_schedule", "grid")
        renoise = row.renoise or getattr(bundle, "renoise", "fresh")
        if renoise != "fresh":  # files made before the option existed stay valid
            identity["renoise"] = renoise
        unguided = getattr(bundle, "unguided", None)
        if unguided:  # sampling.json's unguided sampling, and the weights of its first-step LoRA
            first = unguided.get("first_step")
            identity["unguided"] = {**unguided, "weights": _stamp(Path(bundle.path) / first) if first else []}
    return identity


def generate_cached(bundle, row, prompts: list[str], seed: int, folder: Path, batch_size: int = 32,
                    image_format: str = "uint8", tag: str = "") -> tuple[np.ndarray, dict]:
    """Images of one row (a ``pipeline.Row``), plus {"seconds", "unet_evals"} (UNet evaluations per image,
    counted); reused from ``folder`` when the same model folder, prompts and seeds made them before.

    image_format "uint8": 8-bit images [N, H, W, 3] (what a user saves); "float32": the decoder's output
    [N, 3, H, W] in [-1, 1]. ``tag`` names a prompt set in the file name (e.g. "paraphrase").
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; use one of {', '.join(IMAGE_FORMATS)}")
    identity = _identity(bundle, row, prompts, seed, image_format)
    path = cache_path(folder, row.key, len(prompts), seed, image_format, tag)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["identity"])) == identity:
                return f["images"], json.loads(str(f["timing"]))
    bundle.sampling_options(row.options)  # refuses what the model cannot sample before any work
    convert = to_pixels if image_format == "uint8" else (lambda x: x.float().cpu().numpy())
    chunks, counter, t0 = [], UNetCounter(bundle.unet), time.perf_counter()
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=row.key, leave=False):
            batch = prompts[i:i + batch_size]
            seeds = [seed + i + j for j in range(len(batch))]
            chunks.append(convert(bundle.generate(batch, seeds, options=row.options)))
    finally:
        counter.remove()
    timing = {"seconds": round(time.perf_counter() - t0, 2), "unet_evals": counter.count / len(prompts)}
    images = np.concatenate(chunks)
    with atomic_path(path) as tmp:
        np.savez(tmp, images=images, identity=json.dumps(identity), timing=json.dumps(timing))
    return images, timing


def cache_path(folder: Path, key: str, num: int, seed: int, image_format: str = "uint8", tag: str = "") -> Path:
    """Where ``generate_cached`` keeps the images of the row with key ``key``."""
    suffix = "".join(f"-{t}" for t in (tag, "f32" if image_format == "float32" else "") if t)
    return Path(folder) / f"{key}-n{num}-s{seed}{suffix}.npz"


def cached_images(folder: Path, key: str, prompts: list[str], seed: int, image_format: str = "uint8",
                  tag: str = "") -> np.ndarray | None:
    """The images ``generate_cached`` stored for row ``key`` on these prompts and seeds, or None; read without the
    model, so the weights it was made with are not checked (the caller's results file names them)."""
    path = cache_path(folder, key, len(prompts), seed, image_format, tag)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        identity = json.loads(str(f["identity"]))
        same = (identity.get("row"), identity.get("seed"), identity.get("prompts_sha")) == (key, seed, _sha(prompts))
        return f["images"] if same else None


__all__ = ["generate_cached", "cached_images", "cache_path", "UNetCounter", "IMAGE_FORMATS"]
