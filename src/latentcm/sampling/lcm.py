"""Multistep latent consistency sampling (LCM Algorithm 3). Randomness is injected."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import parameterization as P
from ..schedules import alpha_sigma_at, table_or_default

ConsistencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(x [B, ...], t [B] long) -> x0 [B, ...]
NoiseFn = Callable[[int], torch.Tensor]  # noise_fn(i) -> N(0, I) noise [B, ...] for re-noising after step i


def renoise(denoised: torch.Tensor, t_next, noise: torch.Tensor,
            alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """z_{t_next} = alpha_{t_next} z + sigma_{t_next} noise, with FRESH noise (LCM Algorithm 3)."""
    alpha, sigma = alpha_sigma_at(table_or_default(alpha_bar).to(denoised.device), t_next)
    return P.append_dims(alpha, denoised) * denoised + P.append_dims(sigma, denoised) * noise  # [B, ...]


def lcm_step(model_output: torch.Tensor, t: int, x_t: torch.Tensor, t_next: int | None, noise: torch.Tensor | None,
             *, alpha_bar: torch.Tensor | None = None, prediction_type: str = "epsilon",
             sigma_data: float = P.SIGMA_DATA,
             timestep_scaling: float = P.TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """One multistep-sampling step from a raw network output, as diffusers' ``LCMScheduler.step`` (LCM Algorithm 3).

    Args:
        model_output: network output at (x_t, t) [B, ...] of kind ``prediction_type``.
        t: current timestep.
        x_t: current latents [B, ...].
        t_next: the next timestep of the schedule, or None on the last step (then no noise is added).
        noise: N(0, I) noise [B, ...] for the re-noising (ignored when t_next is None).
        alpha_bar: schedule table [T]; Stable Diffusion's by default.

    Returns:
        (x_next, denoised), like ``LCMSchedulerOutput(prev_sample, denoised)``.
    """
    table = table_or_default(alpha_bar).to(x_t.device)
    alpha_t, sigma_t = alpha_sigma_at(table, t)
    x0_pred = P.x0_from_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    denoised = P.consistency_fn(x_t, x0_pred, t, sigma_data=sigma_data, timestep_scaling=timestep_scaling)
    if t_next is None:
        return denoised, denoised
    return renoise(denoised, t_next, noise, table), denoised


@torch.no_grad()
def sample_lcm(consistency_fn: ConsistencyFn, latents: torch.Tensor, timesteps: Sequence[int] | torch.Tensor, *,
               noise_fn: NoiseFn, alpha_bar: torch.Tensor | None = None,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Multistep latent consistency sampling (LCM Algorithm 3): denoise, re-noise to the next t, repeat.

    Args:
        consistency_fn: the student f_theta(x, t) -> x0 (guidance and prompt already bound), t a [B] long tensor.
        latents: z_{timesteps[0]} [B, ...] (pure noise for text-to-image).
        timesteps: descending schedule, e.g. ``schedules.lcm_timesteps(4)``.
        noise_fn: noise_fn(i) -> fresh N(0, I) noise like ``latents`` used after step i (see ``per_image_noise``).
        alpha_bar: schedule table [T]; Stable Diffusion's by default.
        callback: called after every step with {"i", "t", "x", "denoised"}.

    Returns:
        The last ``denoised`` [B, ...] (not a re-noised latent).
    """
    table = table_or_default(alpha_bar).to(latents.device)
    ts = [int(t) for t in timesteps]
    x = latents
    for i, t in enumerate(ts):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # [B]
        denoised = consistency_fn(x, t_batch)  # [B, ...]
        if i + 1 < len(ts):
            x = renoise(denoised, ts[i + 1], noise_fn(i).to(denoised), table)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return denoised


def per_image_noise(seeds: Sequence[int], shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> NoiseFn:
    """A ``noise_fn`` with one CPU generator per image seed, so an image never depends on the batch size.

    Image b's stream is torch.Generator().manual_seed(seeds[b]) drawing tensors of ``shape`` ([C, H, W]);
    noise_fn(i) returns draw i + 1, and noise_fn(-1) returns draw 0, which equals
    ``sampling.initial_latents(seeds, shape)`` -- so the initial latents and the step noises form one
    stream per seed (like diffusers, which draws both from the same generator). Draws are cached, so
    noise_fn(i) is a pure function of i.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    draws: list[torch.Tensor] = []

    def noise_fn(i: int) -> torch.Tensor:
        while len(draws) <= i + 1:
            draws.append(torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in gens]))
        return draws[i + 1].to(device)  # [B, *shape]

    return noise_fn
