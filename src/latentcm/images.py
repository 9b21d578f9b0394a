"""Images: files -> 8-bit RGB (every PIL mode) -> tensors in [-1, 1], tensors -> PNG grids, VAE round trips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ModelError, one_line

BACKGROUND = (255, 255, 255)  # transparency is composited on white (documented in ``to_rgb``)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB with the values a viewer shows (PIL's own ``convert("RGB")`` clips
    16-bit and 32-bit grey to 0..255, so a 16-bit PNG comes out pure white).

    * ``I;16*`` (16-bit grey): v * 255 / 65535, rounded.
    * ``I`` (32-bit integer grey): read as 8-bit when every value is in 0..255, else as 16-bit
      (clipped to 0..65535, then as ``I;16``).
    * ``F`` (32-bit float grey): read as 0..1 when every finite value is in [0, 1], else as 0..255
      (clipped); NaN reads as 0.
    * transparency (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, ``P`` / ``L`` / ``RGB`` with a
      ``transparency`` entry): alpha-composited on white (``BACKGROUND``), so a transparent pixel is white.
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``: PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _16BIT_MODES or mode == "I":
        a = np.asarray(image).astype(np.float64)
        if mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
            grey = a
        else:
            grey = np.clip(a, 0, 65535) * (255.0 / 65535.0)
        return _grey(grey)
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=np.inf, neginf=-np.inf)  # keep +-inf
        finite = a[np.isfinite(a)]
        unit = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        return _grey(np.clip(a, 0, 1) * 255.0 if unit else np.clip(a, 0, 255))
    if mode in ("RGBa", "La"):  # premultiplied alpha: over the background, out = c + (1 - alpha) * background
        a = np.asarray(image).astype(np.float64)
        colour = a[..., :3] if mode == "RGBa" else np.repeat(a[..., :1], 3, axis=-1)
        alpha = a[..., -1:] / 255.0
        out = np.rint(np.clip(colour + (1 - alpha) * np.asarray(BACKGROUND, np.float64), 0, 255)).astype(np.uint8)
        return Image.fromarray(out, "RGB")
    if mode in ("P", "L", "RGB", "PA", "LA", "1") and ("transparency" in image.info or mode in ("PA", "LA")):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _grey(values: np.ndarray) -> Image.Image:
    """Grey levels (float, 0..255) [H, W] -> an RGB image."""
    v = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    return Image.fromarray(np.stack([v, v, v], axis=-1), "RGB")


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Model images [B, 3, H, W] in [-1, 1] (any device / dtype) -> 8-bit pixels [B, H, W, 3]: round((x + 1) 127.5)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_pixels(pixels) -> torch.Tensor:
    """8-bit pixels [B, H, W, 3] or [H, W, 3] (numpy or tensor, any integer or float dtype holding 0..255)
    -> float32 model images [B, 3, H, W] (or [3, H, W]) in [-1, 1]: x / 127.5 - 1."""
    x = torch.from_numpy(np.array(pixels, dtype=np.float32)) / 127.5 - 1.0
    return x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def to_uint8_grid(images: torch.Tensor, cols: int = 8) -> np.ndarray:
    """images in [-1, 1], [B, 3, H, W] -> one uint8 grid [rows*H, cols*W, 3]."""
    x = to_pixels(images)
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
    image = to_rgb(image)
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
    except Exception as exc:  # noqa: BLE001 -- PIL's decoders raise many kinds of error on corrupt bytes
        raise ModelError(f"cannot read init image {path}: {one_line(exc)}") from None
    return from_pixels(np.asarray(image))[None]  # [1, 3, H, W]
