"""Classifier-free-guided sampling of a diffusion teacher with diffusers' schedulers (DDIM, DPM-Solver,
DPM-Solver++): the baselines of LCM Table 1. Randomness is injected (initial latents from per-image seeds)."""
from __future__ import annotations

from typing import Callable

import torch

from ..defaults import TEACHER_SAMPLERS, TRAILING
from ..errors import ModelError
from ..guidance import guidance_from_omega, interval_omega, omega_from_guidance

# eps_fn(z, t, text_states) -> eps prediction; one UNet call on a whole batch.
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def initial_latents(seeds: list[int], shape: tuple[int, ...], dtype=torch.float32,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """One generator per image seed, so an image never changes with the batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=dtype)
                        for s in seeds]).to(device)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, user convention g: eps_u + g (eps_c - eps_u); g = 1 + paper omega."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def guidance_at(guidance: float, t, guidance_max_t: int | None) -> float:
    """g at timestep t under a guidance interval: g where t <= guidance_max_t, 1 (the conditional model) above
    (Kynkaanniemi et al. 2024); guidance_max_t None guides every step."""
    return guidance_from_omega(interval_omega(omega_from_guidance(float(guidance)), int(t), guidance_max_t))


@torch.no_grad()
def sample_teacher(eps_fn: EpsFn, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor, guidance: float, steps: int,
                   callback: Callable[[int, torch.Tensor], None] | None = None,
                   guidance_max_t: int | None = None) -> torch.Tensor:
    """Classifier-free-guided sampling of a diffusion teacher with a diffusers scheduler
    (DDIM / DPM-Solver / DPM-Solver++). The conditional and unconditional passes run
    as one batched forward. ``guidance_max_t``: guide only the steps at t <= it (``guidance_at``).
    Returns the final latents (unscaled by the VAE factor)."""
    scheduler.set_timesteps(steps, device=latents.device)
    z = latents * scheduler.init_noise_sigma
    text = torch.cat([uncond, cond])  # [2B, L, D]
    for i, t in enumerate(scheduler.timesteps):
        z_in = scheduler.scale_model_input(torch.cat([z, z]), t)
        eps_u, eps_c = eps_fn(z_in, t, text).chunk(2)
        z = scheduler.step(cfg_combine(eps_u, eps_c, guidance_at(guidance, t, guidance_max_t)), t, z).prev_sample
        if callback is not None:
            callback(i, z)
    return z


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler for teacher sampling, built from the teacher's config; a ``-trailing`` name
    overrides its timestep spacing with "trailing" (timesteps T - 1, ..., as the LCM sampler's first step)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    base = {k: v for k, v in config.items() if not k.startswith("_")}
    if name in TEACHER_SAMPLERS and name.endswith(TRAILING):  # the same solver on a trailing grid
        name, base["timestep_spacing"] = name[:-len(TRAILING)], "trailing"
    if name == "ddim":
        return DDIMScheduler.from_config(base)
    if name in ("dpm-solver", "dpm-solver++"):
        algo = "dpmsolver" if name == "dpm-solver" else "dpmsolver++"
        # DPM-Solver (noise prediction) cannot step to sigma = 0; diffusers ends it at sigma_min.
        final = "zero" if algo == "dpmsolver++" else "sigma_min"
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type=algo, solver_order=2,
                                                       final_sigmas_type=final)
    raise ModelError(f"unknown sampler {name!r}; choose from {', '.join(TEACHER_SAMPLERS)}")
