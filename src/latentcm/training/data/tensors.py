"""Cached training tensors: D_z of LCM Algorithm 1 line 1, latents and prompt encodings computed once.

Every data source (the shapes world, a user's image folder) ends as an :class:`LCDData`; it is encoded
once by the model's VAE and text encoder and cached as an atomic safetensors file.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...files import atomic_path
from ...images import from_pixels
from ...models.components import encode_text


@dataclass
class LCDData:
    """D_z of Algorithm 1 line 1: latents and prompt encodings, computed once."""

    latents: torch.Tensor        # [N, C, h, w]: VAE posterior mode * scaling_factor
    text_states: torch.Tensor    # [N, L, D]: the caption of each latent
    uncond_states: torch.Tensor  # [1, L, D]: the empty prompt

    def __len__(self) -> int:
        return len(self.latents)

    def to(self, device) -> "LCDData":
        return LCDData(self.latents.to(device), self.text_states.to(device), self.uncond_states.to(device))

    def save(self, path: Path, meta: dict) -> Path:
        """Atomic safetensors file (temp file, then rename)."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in asdict(self).items()}, str(tmp),
                      metadata={"meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Path, meta: dict) -> "LCDData | None":
        """The cached data, or None when there is none or it was made with other settings."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            if json.loads(fh.metadata().get("meta", "{}")) != meta:
                return None
        return cls(**load_file(str(path)))


def _pixels(images) -> torch.Tensor:
    """PIL images or uint8 [H, W, 3] arrays -> float [B, 3, H, W] in [-1, 1]."""
    return from_pixels(np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8)
                                 for im in images]))


@torch.no_grad()
def encode_pairs(vae, text_encoder, tokenizer, pairs, batch_size: int = 64, *, text_fn=None,
                 uncond_fn=None) -> LCDData:
    """Encode (image, caption) pairs once: latents = mode of q(z | x) * scaling_factor, and text states.

    ``text_fn(captions)`` / ``uncond_fn()`` replace the single-encoder encoding (SDXL: ``Bundle.encode_prompts``
    and ``Bundle.encode_uncond(1)``, the packed two-encoder conditioning with zero uncond embeddings).
    """
    total = len(pairs) if hasattr(pairs, "__len__") else None
    pairs = iter(pairs)  # consumed a batch at a time: rendering and encoding share the progress bar
    if text_fn is None:
        def text_fn(captions):
            return encode_text(text_encoder, tokenizer, captions)
    if uncond_fn is None:
        def uncond_fn():
            return encode_text(text_encoder, tokenizer, [""])
    latents, states = [], []
    with tqdm(total=total, desc="encode data", unit="img", dynamic_ncols=True, mininterval=1.0, delay=2.0) as bar:
        while chunk := list(itertools.islice(pairs, batch_size)):
            images, captions = zip(*chunk)
            x = _pixels(images).to(vae.device, vae.dtype)
            latents.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)  # [b, C, h, w]
            states.append(text_fn(list(captions)))  # [b, L, D]
            bar.update(len(chunk))
    if not latents:
        raise ValueError("no image-caption pairs to encode")
    uncond = uncond_fn()  # [1, L, D]
    # contiguous: the in-memory data must match the cached file bit for bit (a resumed run reads the cache)
    return LCDData(torch.cat(latents).float().cpu().contiguous(), torch.cat(states).float().cpu(), uncond.float().cpu())


def bundle_text_fns(bundle) -> dict:
    """``encode_pairs`` keywords for a bundle whose conditioning is not a single encoder's (SDXL); else {}."""
    if not getattr(bundle, "is_sdxl", False):
        return {}
    return {"text_fn": bundle.encode_prompts, "uncond_fn": lambda: bundle.encode_uncond(1)}
