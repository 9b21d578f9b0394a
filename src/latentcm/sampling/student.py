"""Few-step sampling of an LCM (or a teacher carrying an LCM-LoRA): text-to-image and img2img latents.

The consistency function is ``models.denoiser.ConsistencyModel``; the loop is ``sampling.lcm.sample_lcm``
(LCM Algorithm 3). img2img follows diffusers' ``LatentConsistencyModelImg2ImgPipeline``: the clean latent is
noised to the first timestep of the truncated skipping grid with draw 0 of the image's seed stream.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import parameterization as P
from ..defaults import LCM_OMEGA, LCM_STEPS, TIMESTEP_SCHEDULES
from ..guidance import guidance_scale_embedding
from ..models.denoiser import ConsistencyModel, Denoiser
from ..solvers import guide
from ..schedules import GRID_POINTS, TRAIN_TIMESTEPS, lcm_timesteps, refine_timesteps, validate_timesteps
from .lcm import per_image_noise, renoise as add_noise, sample_lcm


@torch.no_grad()
def sample_student(unet: torch.nn.Module, scheduler_config: dict, text_states: torch.Tensor, seeds: list[int],
                   shape: tuple[int, int, int], *, steps: int = LCM_STEPS, omega: float = LCM_OMEGA,
                   original_inference_steps: int | None = None, timestep_scaling: float | None = None,
                   latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                   strength: float = 1.0, gamma: float | None = None,
                   timesteps: Sequence[int] | None = None, schedule: str = "grid",
                   uncond: torch.Tensor | None = None, renoise: str = "fresh",
                   first_step_unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Few-step latents of an LCM student (LCM Algorithm 3), one noise stream per image seed.

    Args:
        unet: the student (with ``time_cond_proj_dim``), or a teacher UNet carrying an LCM-LoRA (without).
        scheduler_config: its schedule (betas, prediction_type; an LCMScheduler config also gives
            ``original_inference_steps`` and ``timestep_scaling``).
        text_states: prompt encodings [B, L, D].
        seeds: one seed per image; seed b's stream gives the initial latents, then the step noises.
        shape: latent shape [C, h, w].
        steps: number of sampling steps, on the skipping grid of ``original_inference_steps`` points.
        omega: the paper's guidance w (= diffusers guidance_scale - 1).
        original_inference_steps: N of the skipping grid; default the config's, else GRID_POINTS.
        timestep_scaling: s of c_skip / c_out; default the config's, else ``parameterization.TIMESTEP_SCALING``.
        latents: initial latents [B, C, h, w] replacing each stream's first draw (the step noises stay per seed).
        image_latents: img2img: clean latents x0 [B, C, h, w] (VAE mode x scaling_factor), noised to the first
            timestep with each stream's first draw, as diffusers' LatentConsistencyModelImg2ImgPipeline does.
        strength: img2img strength in (0, 1]: the skipping grid is truncated to its first N * strength points.
        gamma: None (default) for LCM Algorithm 3; else TCD's stochasticity in [0, 1] (``sampling.lcm.tcd_move``,
            Zheng et al. 2024, as diffusers' TCDScheduler): 0 is deterministic.
        timesteps: an explicit descending schedule (text-to-image; ``steps`` is then its length), as the
            ``timesteps`` argument of diffusers' LCM pipelines; None selects ``steps`` points of the grid as
            diffusers' LCMScheduler does. Off-grid timesteps warn (``schedules.validate_timesteps``).
        schedule: how ``steps`` timesteps are picked when none are given: "grid" (diffusers' LCMScheduler) or
            "refine" (``schedules.refine_timesteps``: after the first, every step at low noise).
        uncond: a real-CFG LCM (no w input): the unconditional (or negative-prompt) encodings [B, L, D]; each step
            then guides the consistency function, f_0 + g (f_c - f_0) with g = 1 + omega, which is CFG on the raw
            output as diffusers' StableDiffusionPipeline + LCMScheduler does (f is affine in it at fixed z_t). For
            an LCM with a w input (one distilled from w = 0) both passes read w = 0: CFG between its unguided
            predictions, how it takes a negative prompt.
        renoise: Algorithm 3's re-noising noise, "fresh" or "keep-means" (``defaults.RENOISE``).
        first_step_unet: the first step's UNet where the w input is 0 (``_sampling_fn``, ``Bundle.first_step_unet``).

    Returns:
        Denoised latents [B, C, h, w] (unscaled by the VAE factor).
    """
    n_grid = original_inference_steps or scheduler_config.get("original_inference_steps", GRID_POINTS)
    scaling = timestep_scaling if timestep_scaling is not None else scheduler_config.get(
        "timestep_scaling", P.TIMESTEP_SCALING)
    f = ConsistencyModel(Denoiser(unet, scheduler_config), timestep_scaling=scaling)
    p = next(unet.parameters())
    w, w_emb = _w_input(unet, p, omega, len(seeds))
    noise_fn = per_image_noise(seeds, shape, dtype=p.dtype, device=p.device)
    _check_inputs(latents, image_latents, strength, timesteps)
    ts = (inference_timesteps(schedule, steps, len(f.denoiser.alpha_bar), n_grid, strength) if timesteps is None
          else validate_timesteps(timesteps, len(f.denoiser.alpha_bar), n_grid))
    x_T = noise_fn(-1) if latents is None else latents.to(p.device, p.dtype)  # [B, C, h, w]
    if image_latents is not None:  # img2img: z_{ts[0]} = alpha x0 + sigma noise (forward diffusion)
        x_T = add_noise(image_latents.to(p.device, p.dtype), int(ts[0]), x_T, f.denoiser.alpha_bar)
    fn = _sampling_fn(f, scheduler_config, text_states, uncond, w, w_emb, int(ts[0]),
                      None if image_latents is not None else first_step_unet)
    return sample_lcm(fn, x_T, ts, noise_fn=noise_fn, alpha_bar=f.denoiser.alpha_bar, gamma=gamma,
                      keep_means=renoise == "keep-means")


def _w_input(unet: torch.nn.Module, p: torch.Tensor, omega: float,
             n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w [n], its embedding [n, d]) on ``p``'s device and dtype; an LCM-LoRA'd teacher has no w input (its guidance
    is distilled in, LCM-LoRA, arXiv 2311.05556): embedding None, omega unused."""
    w = torch.full((n,), float(omega), device=p.device)
    d = unet.config.get("time_cond_proj_dim")
    return w, guidance_scale_embedding(w, d).to(p.dtype) if d is not None else None


def _sampling_fn(f: ConsistencyModel, scheduler_config: dict, text_states: torch.Tensor, uncond: torch.Tensor | None,
                 w: torch.Tensor, w_emb: torch.Tensor | None, t_first: int, first_step_unet: torch.nn.Module | None):
    """x, t -> each step's consistency output (``_guided_fn``). Where the network's w input is 0 -- unguided
    sampling (w = 0), or real CFG between w = 0 predictions (``uncond``: a negative prompt) -- and the schedule starts
    from pure noise at the top timestep (``t_first`` = T - 1), the first step is ``first_step_unet``'s instead (the
    schedule descends, so no later step is at ``t_first``)."""
    fn = _guided_fn(f, text_states, uncond, w, w_emb)
    reads_w0 = uncond is not None or not bool(w.any())
    if first_step_unet is None or not reads_w0 or t_first != len(f.denoiser.alpha_bar) - 1:
        return fn
    f0 = ConsistencyModel(Denoiser(first_step_unet, scheduler_config), sigma_data=f.sigma_data,
                          timestep_scaling=f.timestep_scaling)
    first = _guided_fn(f0, text_states, uncond, w, w_emb)
    return lambda x, t: (first if int(t[0]) == t_first else fn)(x, t)


def _guided_fn(f: ConsistencyModel, text_states: torch.Tensor, uncond: torch.Tensor | None, w: torch.Tensor,
               w_emb: torch.Tensor | None):
    """x, t -> the guided consistency output: the w input alone, or real CFG when there is an unconditional
    branch; a w-input LCM then reads w = 0, its unguided end (a negative prompt, ``unguided_w0``)."""
    if uncond is None:
        return lambda x, t: f(x, t, text_states, w_emb)
    w0_emb = None if w_emb is None else guidance_scale_embedding(torch.zeros_like(w), w_emb.shape[1]).to(w_emb.dtype)
    return cfg_consistency(f, text_states, uncond, w, w0_emb)


def _check_inputs(latents, image_latents, strength: float, timesteps) -> None:
    if image_latents is None and strength != 1.0:
        raise ValueError("strength < 1 needs image_latents (img2img)")
    if image_latents is not None and latents is not None:
        raise ValueError("pass latents (text-to-image) or image_latents (img2img), not both")
    if timesteps is not None and image_latents is not None:
        raise ValueError("explicit timesteps are for text-to-image; img2img picks them from strength")


def cfg_consistency(f: ConsistencyModel, cond: torch.Tensor, uncond: torch.Tensor, omega: torch.Tensor,
                    w_emb: torch.Tensor | None = None):
    """Real CFG on a consistency model: f_c + w (f_c - f_0) (LCM Eq. 6 form), cond and uncond in one batched pass;
    ``w_emb`` [B, d]: the w input both passes get (a w-input LCM at w = 0), None for a real-CFG LCM."""
    text = torch.cat([cond, uncond])  # [2B, L, D]
    emb = None if w_emb is None else torch.cat([w_emb, w_emb])

    def fn(x, t):
        f_c, f_0 = f(torch.cat([x, x]), torch.cat([t, t]), text, emb).chunk(2)
        return guide(f_c, f_0, omega)
    return fn


def inference_timesteps(schedule: str, num_inference_steps: int, num_train_timesteps: int = TRAIN_TIMESTEPS,
                        original_inference_steps: int = GRID_POINTS, strength: float = 1.0) -> torch.Tensor:
    """The LCM sampler's timesteps: "grid" selects from the skipping grid as diffusers' LCMScheduler
    (``lcm_timesteps``; img2img's ``strength`` truncates the grid), "refine" is ``refine_timesteps``
    (text-to-image only)."""
    if schedule == "grid":
        return lcm_timesteps(num_inference_steps, num_train_timesteps, original_inference_steps, strength)
    if schedule != "refine":
        raise ValueError(f"unknown timestep schedule {schedule!r}; choose from {', '.join(TIMESTEP_SCHEDULES)}")
    if strength != 1.0:
        raise ValueError("the refine schedule is for text-to-image; img2img selects from the truncated grid")
    return refine_timesteps(num_inference_steps, num_train_timesteps, original_inference_steps)
