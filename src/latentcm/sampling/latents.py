"""The one sampling entry: final latents of any model kind, used by ``Bundle``, img2img and training previews.

An LCM (``sampler="lcm"``) runs the multistep consistency sampler (LCM Algorithm 3, one UNet pass per
step, guidance w = g - 1 fed through the w embedding); a diffusion teacher runs a diffusers scheduler with
classifier-free guidance (two UNet passes per step). ``sample`` takes a resolved ``SamplingOptions``;
``sample_latents`` is the same call with the options as keywords.
"""
from __future__ import annotations

import torch

from ..defaults import LCM_SAMPLER
from ..guidance import guidance_scale_embedding, interval_omega, omega_from_guidance
from ..models.sdxl import unet_forward
from .options import SamplingOptions
from .student import sample_student
from .teacher import initial_latents, make_scheduler, sample_teacher


@torch.no_grad()
def sample(unet: torch.nn.Module, scheduler_config: dict, options: SamplingOptions, cond: torch.Tensor,
           seeds: list[int], shape: tuple[int, int, int], *, uncond: torch.Tensor | None = None,
           latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
           original_inference_steps: int | None = None,
           first_step_unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Final latents [B, C, h, w] (unscaled by the VAE factor), one per seed.

    Args:
        unet: an LCM student, a teacher carrying an LCM-LoRA (``sampler="lcm"``), or a diffusion teacher.
        scheduler_config: the model's scheduler config (an LCMScheduler's gives the skipping grid).
        options: sampler, steps and guidance set (``SamplingOptions.resolve``); ``strength`` set for img2img.
        cond: prompt encodings [B, L, D] (SDXL: the packed conditioning of ``models.sdxl``).
        seeds: one per image; image b depends on seeds[b] only, never on the batch.
        shape: latent shape [C, h, w].
        uncond: the unconditional (or negative-prompt) encodings [B, L, D] of CFG: teacher samplers, and a real-CFG
            LCM (guidance_mode "cfg"); None for an LCM with a w input.
        latents: initial latents [B, C, h, w] instead of each seed's first draw.
        image_latents: img2img (LCM only): the clean latents, noised to the first kept grid point.
        original_inference_steps: N of the skipping grid when the config has none (a student in training).
        first_step_unet: an LCM's unguided first-step UNet (``sampling.student.sample_student``), or None.
    """
    o = options
    if (image_latents is not None) != o.img2img:
        raise ValueError("img2img needs both image_latents and options.strength")
    if o.sampler == LCM_SAMPLER:
        return sample_student(unet, scheduler_config, cond, seeds, shape, steps=o.steps,
                              omega=omega_from_guidance(o.guidance), latents=latents, image_latents=image_latents,
                              strength=1.0 if o.strength is None else o.strength,
                              original_inference_steps=original_inference_steps, gamma=o.gamma,
                              timesteps=o.timesteps, schedule=o.schedule or "grid", uncond=uncond,
                              renoise=o.renoise or "fresh", first_step_unet=first_step_unet)
    if uncond is None:
        raise ValueError("teacher samplers need the unconditional encodings (uncond) for CFG")
    if latents is None:
        latents = initial_latents(seeds, shape, device=cond.device)

    dim = unet.config.get("time_cond_proj_dim") if hasattr(unet, "config") else None
    if dim is not None:  # a guidance-distilled teacher: w is an input, one pass per step
        return sample_guided_teacher(unet, make_scheduler(o.sampler, scheduler_config), latents, cond, o, dim)

    def eps_fn(z, t, text):  # the raw output (eps, v or x0 per the config), SD or SDXL conditioning
        return unet_forward(unet, z, t, text).sample
    return sample_teacher(eps_fn, make_scheduler(o.sampler, scheduler_config), latents, cond, uncond, o.guidance,
                          o.steps, guidance_max_t=o.guidance_max_t)


def sample_guided_teacher(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, o: SamplingOptions,
                          dim: int) -> torch.Tensor:
    """A guidance-distilled teacher (``training.guided``) with a diffusers scheduler: its one pass at w = g - 1
    (w = 0 above ``guidance_max_t``) stands for CFG's two."""
    omega = torch.full((len(latents),), omega_from_guidance(o.guidance), device=latents.device)  # [B]

    def eps_fn(z, t, text):  # text is [uncond; cond] from sample_teacher: the guided pass reads cond only
        w = interval_omega(omega, int(t), o.guidance_max_t)
        out = unet_forward(unet, z[len(omega):], t, text[len(omega):],
                           guidance_scale_embedding(w, dim).to(z.dtype)).sample
        return torch.cat([out, out])  # eps_u = eps_c = the guided eps: cfg_combine returns it for any g
    return sample_teacher(eps_fn, scheduler, latents, cond, cond, 1.0, o.steps)


@torch.no_grad()
def sample_latents(unet: torch.nn.Module, scheduler_config: dict, sampler: str, cond: torch.Tensor, seeds: list[int],
                   shape: tuple[int, int, int], *, steps: int, guidance: float, uncond: torch.Tensor | None = None,
                   latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                   strength: float = 1.0, original_inference_steps: int | None = None,
                   gamma: float | None = None, guidance_max_t: int | None = None,
                   timesteps: list[int] | None = None, schedule: str = "grid") -> torch.Tensor:
    """``sample`` with the options as keywords (``SamplingOptions`` checks them): ``steps`` and ``guidance`` g,
    ``strength`` with ``image_latents`` (img2img), ``gamma`` (TCD), ``guidance_max_t`` (teacher samplers'
    guidance interval), ``timesteps`` (an explicit LCM schedule; ``steps`` is then ignored) and ``schedule``
    ("grid" | "refine", LCM text-to-image; ignored with ``timesteps``)."""
    if image_latents is None and strength != 1.0:
        raise ValueError("strength < 1 needs image_latents (img2img)")
    text_to_image_lcm = sampler == LCM_SAMPLER and timesteps is None and image_latents is None
    options = SamplingOptions(sampler, steps if timesteps is None else None, guidance, gamma, guidance_max_t,
                              timesteps, schedule if text_to_image_lcm else None,
                              None if image_latents is None else strength)
    return sample(unet, scheduler_config, options, cond, seeds, shape, uncond=uncond, latents=latents,
                  image_latents=image_latents, original_inference_steps=original_inference_steps)
