"""The shapes world as training data: rendered images with their scenes (teacher build, plain diffusion)
and encoded latent/caption pairs (distillation)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import world
from ...images import from_pixels
from .tensors import LCDData, bundle_text_fns, encode_pairs

DATA_WORLD_SEED = 1238          # shapes-world seed of the distillation data (the teacher stages use 1234..1237)


@dataclass
class WorldData:
    """Rendered training images [N, 3, 64, 64] uint8 and their scenes."""

    images: torch.Tensor
    scenes: list[world.Scene]

    @classmethod
    def make(cls, seed: int, count: int, split: str = "train") -> "WorldData":
        samples = list(world.iter_samples(seed, count, split))
        arr = world.images_array(samples)
        return cls(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), [s.scene for s in samples])

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [-1, 1]."""
        return from_pixels(self.images[idx].permute(0, 2, 3, 1)).contiguous()  # [B, 3, H, W]


def sample_captions(scenes: list[world.Scene], seed: int, step: int, offset: int = 0) -> list[str]:
    """A fresh training caption per scene and step (templates and synonyms vary)."""
    return [world.caption(s, random.Random(hash((seed, step, offset + i)) & 0xFFFFFFFF))
            for i, s in enumerate(scenes)]


def world_data(bundle, num_data: int, cache: Path | None = None, seed: int = DATA_WORLD_SEED,
               write: bool = True) -> LCDData:
    """Shapes-world training pairs encoded by the teacher's VAE and text encoder, cached in ``cache``."""
    meta = {"num_data": num_data, "world_seed": seed, "teacher": str(bundle.path)}
    found = LCDData.load(cache, meta) if cache is not None else None
    if found is not None:
        return found
    pairs = ((s.image, s.text) for s in world.iter_samples(seed, num_data, "train"))
    data = encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, pairs, **bundle_text_fns(bundle))
    if cache is not None and write:
        data.save(cache, meta)
    return data
