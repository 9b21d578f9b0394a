"""The one sampling entry: final latents of any model kind, used by ``Bundle``, img2img and training previews.

An LCM (``sampler="lcm"``) runs the multistep consistency sampler (LCM Algorithm 3, one UNet pass per
step, guidance w = g - 1 fed through the w embedding); a diffusion teacher runs a diffusers scheduler with
classifier-free guidance (two UNet passes per step).
"""
from __future__ import annotations

import torch

from ..defaults import LCM_SAMPLER
from ..errors import ModelError
from ..guidance import omega_from_guidance
from ..models.sdxl import unet_forward
from .student import sample_student
from .teacher import initial_latents, make_scheduler, sample_teacher


@torch.no_grad()
def sample_latents(unet: torch.nn.Module, scheduler_config: dict, sampler: str, cond: torch.Tensor, seeds: list[int],
                   shape: tuple[int, int, int], *, steps: int, guidance: float, uncond: torch.Tensor | None = None,
                   latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                   strength: float = 1.0, original_inference_steps: int | None = None,
                   gamma: float | None = None, guidance_max_t: int | None = None,
                   timesteps: list[int] | None = None, schedule: str = "grid") -> torch.Tensor:
    """Final latents [B, C, h, w] (unscaled by the VAE factor), one per seed.

    Args:
        unet: an LCM student, a teacher carrying an LCM-LoRA (``sampler="lcm"``), or a diffusion teacher.
        scheduler_config: the model's scheduler config (an LCMScheduler's gives the skipping grid).
        sampler: "lcm" or one of ``defaults.TEACHER_SAMPLERS``.
        cond: prompt encodings [B, L, D] (SDXL: the packed conditioning of ``models.sdxl``).
        seeds: one per image; image b depends on seeds[b] only, never on the batch.
        shape: latent shape [C, h, w].
        steps, guidance: sampling steps and guidance scale g (an LCM is conditioned on w = g - 1).
        uncond: the unconditional encodings [B, L, D] of CFG (teacher samplers only).
        latents: initial latents [B, C, h, w] instead of each seed's first draw.
        image_latents, strength: img2img (LCM only): clean latents and the fraction of the grid kept.
        original_inference_steps: N of the skipping grid when the config has none (a student in training).
        gamma: LCM only: None keeps LCM Algorithm 3; else TCD's stochasticity in [0, 1] (``sampling.lcm.tcd_move``).
        guidance_max_t: teacher samplers only: guide the steps at t <= it, none above (a guidance interval);
            None guides every step. An LCM's interval, if any, was fixed in distillation.
        timesteps: LCM only: an explicit descending schedule instead of the grid's ``steps`` points.
        schedule: LCM only: "grid" (diffusers' selection) or "refine" (``schedules.refine_timesteps``).
    """
    if sampler == LCM_SAMPLER:
        if guidance_max_t is not None:
            raise ModelError("a guidance interval (guidance_max_t) is for teacher samplers; an LCM's was fixed "
                             "when it was distilled (lcm distill --guidance-max-t)")
        return sample_student(unet, scheduler_config, cond, seeds, shape, steps=steps,
                              omega=omega_from_guidance(guidance), latents=latents, image_latents=image_latents,
                              strength=strength, original_inference_steps=original_inference_steps, gamma=gamma,
                              timesteps=timesteps, schedule=schedule)
    if timesteps is not None:
        raise ModelError("explicit timesteps are for the LCM sampler; a teacher sampler takes --steps")
    if gamma is not None:
        raise ModelError("gamma (TCD sampling) needs an LCM (sampler 'lcm'); teacher samplers do not support it")
    if image_latents is not None:
        raise ModelError("img2img needs an LCM (sampler 'lcm'); teacher samplers do not support it")
    if uncond is None:
        raise ValueError("teacher samplers need the unconditional encodings (uncond) for CFG")
    if latents is None:
        latents = initial_latents(seeds, shape, device=cond.device)

    def eps_fn(z, t, text):  # the raw output (eps, v or x0 per the config), SD or SDXL conditioning
        return unet_forward(unet, z, t, text).sample
    return sample_teacher(eps_fn, make_scheduler(sampler, scheduler_config), latents, cond, uncond, guidance, steps,
                          guidance_max_t=guidance_max_t)
