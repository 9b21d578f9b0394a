"""Image-to-image with an LCM: start the multistep consistency sampler from a noised image latent.

As diffusers' ``LatentConsistencyModelImg2ImgPipeline``: the image is encoded by the VAE (here its
posterior *mode* times ``scaling_factor``, so the result does not depend on a posterior draw), the
timesteps are those of ``LCMScheduler.set_timesteps(steps, strength=S)`` (``schedules.lcm_timesteps``:
the skipping grid truncated to its first N * S points), the latent is noised to the first of them with
draw 0 of the image's seed stream, and the usual sampler (``lcm_sampling.sample_lcm``) runs from there
with draws 1, 2, ... as its step noises.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .guidance import omega_from_guidance
from .models.bundle import Bundle, ModelError
from .models.denoiser import sample_student

DEFAULT_STRENGTH = 0.5  # fraction of the skipping grid kept: 1 ignores the image's layout, near 0 keeps it


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


@torch.no_grad()
def encode_images(bundle: Bundle, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w]: VAE posterior mode x scaling_factor."""
    vae = bundle.vae
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()  # [B, C, h, w]
    return z * vae.config.scaling_factor


def check_strength(strength: float) -> float:
    """``strength`` as a float, or ModelError unless it lies in (0, 1]."""
    if not 0.0 < strength <= 1.0:
        raise ModelError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength}")
    return float(strength)


@torch.no_grad()
def img2img_latents(bundle: Bundle, prompts: list[str], seeds: list[int], images: torch.Tensor,
                    strength: float = DEFAULT_STRENGTH, sampler: str | None = None, steps: int | None = None,
                    guidance: float | None = None) -> torch.Tensor:
    """Final latents [B, C, h, w] of LCM img2img; ``images`` [1 or B, 3, H, W] in [-1, 1] set the size.

    Args:
        bundle: an LCM (or a teacher carrying an LCM-LoRA); diffusion teachers are refused.
        prompts, seeds: one per image; seed b's stream noises image b, then gives its step noises.
        images: the init image(s); one image is shared by every prompt.
        strength: in (0, 1]; the sampler starts at the largest grid timestep below N * strength.
        sampler, steps, guidance: as in ``Bundle.generate`` (sampler must be "lcm").
    """
    if not bundle.is_lcm:
        raise ModelError("--init-image (img2img) needs an LCM folder or --lora; teacher samplers do not support it")
    sampler, steps, guidance = bundle.resolve(sampler, steps, guidance)
    bundle.check_sampling(sampler, steps)
    strength = check_strength(strength)
    if len(prompts) != len(seeds) or images.shape[0] not in (1, len(seeds)):
        raise ModelError(f"need one seed per prompt and 1 or {len(seeds)} images, got {len(prompts)} prompts, "
                         f"{len(seeds)} seeds, {images.shape[0]} images")
    x0 = encode_images(bundle, images).expand(len(seeds), -1, -1, -1)  # [B, C, h, w]
    cond = bundle.encode_prompts(prompts)  # [B, L, D]
    return sample_student(bundle.unet, bundle.scheduler_config, cond, seeds, tuple(x0.shape[1:]), steps=steps,
                          omega=omega_from_guidance(guidance), image_latents=x0, strength=strength)


def img2img(bundle: Bundle, prompts: list[str], seeds: list[int], image_path: str | Path,
            strength: float = DEFAULT_STRENGTH, sampler: str | None = None, steps: int | None = None,
            guidance: float | None = None, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] from an init image file (fitted to height x width, default the model's)."""
    size = bundle.unet.config.sample_size * bundle.vae_factor
    height, width = height or size, width or size
    bundle.latent_shape(height, width)  # ModelError unless divisible by the VAE factor
    images = load_image(image_path, width, height)
    return bundle.decode(img2img_latents(bundle, prompts, seeds, images, strength, sampler, steps, guidance))

