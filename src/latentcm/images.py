"""Images: files -> tensors in [-1, 1] (init images), tensors -> PNG grids, VAE round trips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ModelError


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


def fit_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic) so the image covers width x height, then centre-crop to exactly that size."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    nw, nh = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(path: str | Path, width: int, height: int) -> torch.Tensor:
    """An image file -> [1, 3, height, width] in [-1, 1] (fitted by ``fit_cover``); ModelError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"init image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            image = fit_cover(im, width, height)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ModelError(f"cannot read init image {path}: {exc}") from None
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # [H, W, 3]
    return x.permute(2, 0, 1)[None]  # [1, 3, H, W]
