"""Image grids: tensors in [-1, 1] -> PNG files; VAE round trips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_grid(images: torch.Tensor, cols: int = 8) -> np.ndarray:
    """images in [-1, 1], [B, 3, H, W] -> one uint8 grid [rows*H, cols*W, 3]."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    b, h, w, _ = x.shape
    rows = -(-b // cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(b):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = x[i]
    return grid


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_grid(images, cols)).save(path)
    return path


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> decode(mode of encode(images)): the best a latent model using
    this VAE can draw them."""
    parts = [vae.decode(vae.encode(images[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mode())
             .sample.clamp(-1, 1).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts)
