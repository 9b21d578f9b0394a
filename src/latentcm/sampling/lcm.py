"""Multistep latent consistency sampling (LCM Algorithm 3), and its TCD variant with stochasticity gamma
(Zheng et al. 2024, Trajectory Consistency Distillation, arXiv 2402.19159: "strategic stochastic sampling",
the sampler of diffusers' ``TCDScheduler``). Randomness is injected.

Algorithm 3 re-noises with fresh noise. ``keep_means`` (``defaults.RENOISE`` "keep-means") replaces the fresh
noise's per-channel spatial means by those of the step's own noise estimate (``keep_channel_means``): DDIM,
deterministic, on those C directions, Algorithm 3 on the rest. The teacher's ODE settles an image's background on
the channel means of its initial noise (``scripts/noise_background_probe.py``); fresh noise redraws them at every
step."""
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


def noise_estimate(x_t: torch.Tensor, denoised: torch.Tensor, t: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - alpha_t x0) / sigma_t: the noise that x0 = ``denoised`` implies at (x_t, t) [B, ...]."""
    alpha_t, sigma_t = alpha_sigma_at(alpha_bar.to(x_t.device), int(t))
    return (x_t - alpha_t.to(x_t.dtype) * denoised) / sigma_t.to(x_t.dtype)


def keep_channel_means(noise: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """``noise`` [B, C, ...] with each channel's spatial mean replaced by ``estimate``'s. For i.i.d. N(0, I) noise
    the channel means are independent of the rest, so the result is N(0, I) whenever the estimate's means are
    distributed as noise means (an exact model's noise estimate)."""
    dims = tuple(range(2, noise.ndim))
    return noise - noise.mean(dims, keepdim=True) + estimate.mean(dims, keepdim=True)


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


def tcd_s(t_prev: int, gamma: float) -> int:
    """TCD's intermediate timestep s = floor((1 - gamma) t_prev), computed in float32 as ``TCDScheduler``."""
    return int(torch.floor((1 - gamma) * torch.tensor(int(t_prev))))


def tcd_move(denoised: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int | None, noise: torch.Tensor | None,
             gamma: float, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """One TCD step from the data estimate x0 = ``denoised`` at (x_t, t) (TCD, arXiv 2402.19159, Eq. 15 / Alg. 4):

        eps    = (x_t - alpha_t x0) / sigma_t                          the noise estimate
        s      = floor((1 - gamma) t_prev)                             (t_prev = 0 after the last step)
        x_s    = alpha_s x0 + sigma_s eps                              DDIM from t down to s
        x_prev = sqrt(ab_prev / ab_s) x_s + sqrt(1 - ab_prev / ab_s) z  forward diffusion from s back up to t_prev

    gamma = 0 is deterministic DDIM (s = t_prev, no noise); gamma = 1 re-noises from timestep 0. As in
    ``TCDScheduler`` the last step (t_prev None) returns x_s at s = 0 -- the latent at timestep 0
    (alpha_bar[0] < 1), not x0 -- and noise is drawn only when gamma > 0 and a step follows.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    table = table_or_default(alpha_bar).to(x_t.device)
    eps = noise_estimate(x_t, denoised, t, table)  # [B, ...]
    s = tcd_s(0 if t_prev is None else t_prev, gamma)
    ab_s = table[s]
    x_s = ab_s.sqrt().to(x_t.dtype) * denoised + (1 - ab_s).sqrt().to(x_t.dtype) * eps
    if t_prev is None or gamma == 0:
        return x_s
    ratio = table[int(t_prev)] / ab_s
    return ratio.sqrt().to(x_t.dtype) * x_s + (1 - ratio).sqrt().to(x_t.dtype) * noise.to(x_s)


def tcd_step(model_output: torch.Tensor, t: int, x_t: torch.Tensor, t_prev: int | None, noise: torch.Tensor | None,
             gamma: float, *, alpha_bar: torch.Tensor | None = None,
             prediction_type: str = "epsilon") -> torch.Tensor:
    """``TCDScheduler.step(model_output, t, x_t, eta=gamma).prev_sample`` from a raw network output: x0 is the
    network's own prediction (no c_skip / c_out boundary condition, as TCD), then ``tcd_move``."""
    table = table_or_default(alpha_bar).to(x_t.device)
    alpha_t, sigma_t = alpha_sigma_at(table, int(t))
    x0_pred = P.x0_from_output(model_output, x_t, alpha_t, sigma_t, prediction_type)
    return tcd_move(x0_pred, x_t, t, t_prev, noise, gamma, table)


@torch.no_grad()
def sample_lcm(consistency_fn: ConsistencyFn, latents: torch.Tensor, timesteps: Sequence[int] | torch.Tensor, *,
               noise_fn: NoiseFn, alpha_bar: torch.Tensor | None = None,
               callback: Callable[[dict], None] | None = None, gamma: float | None = None,
               keep_means: bool = False) -> torch.Tensor:
    """Multistep latent consistency sampling (LCM Algorithm 3): denoise, re-noise to the next t, repeat.

    With ``gamma`` (TCD's stochasticity in [0, 1]) each step instead moves by ``tcd_move`` (DDIM to
    s = floor((1 - gamma) t_next), then re-noising from s to t_next) and the last step returns the
    timestep-0 latent, as diffusers' ``TCDScheduler``; gamma None (the default) is LCM Algorithm 3.

    Args:
        consistency_fn: the student f_theta(x, t) -> x0 (guidance and prompt already bound), t a [B] long tensor.
        latents: z_{timesteps[0]} [B, ...] (pure noise for text-to-image).
        timesteps: descending schedule, e.g. ``schedules.lcm_timesteps(4)``.
        noise_fn: noise_fn(i) -> fresh N(0, I) noise like ``latents`` used after step i (see ``per_image_noise``).
        alpha_bar: schedule table [T]; Stable Diffusion's by default.
        callback: called after every step with {"i", "t", "x", "denoised"}.
        gamma: None for LCM sampling, else TCD's gamma (0 = deterministic; see ``tcd_move``).
        keep_means: Algorithm 3's re-noising noise with its channel means from the step's noise estimate
            (``keep_channel_means``) instead of fresh ones. Not with gamma.

    Returns:
        The last ``denoised`` [B, ...] (not a re-noised latent); with gamma, the timestep-0 latent.
    """
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma is not None and keep_means:
        raise ValueError("keep_means is Algorithm 3's re-noising; TCD (gamma) has its own")
    table = table_or_default(alpha_bar).to(latents.device)
    ts = [int(t) for t in timesteps]
    x = latents
    for i, t in enumerate(ts):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # [B]
        denoised = consistency_fn(x, t_batch)  # [B, ...]
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        if gamma is None and t_next is not None:  # Algorithm 3: fresh noise to the next t
            noise = noise_fn(i).to(denoised)
            if keep_means:
                noise = keep_channel_means(noise, noise_estimate(x, denoised, t, table))
            x = renoise(denoised, t_next, noise, table)
        elif gamma is not None:  # TCD: DDIM to s, then re-noise from s to t_next
            noise = noise_fn(i) if t_next is not None and gamma > 0 else None
            x = tcd_move(denoised, x, t, t_next, noise, float(gamma), table)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": denoised})
    return denoised if gamma is None else x


def per_image_noise(seeds: Sequence[int], shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> NoiseFn:
    """A ``noise_fn`` with one CPU generator per image seed, so an image never depends on the batch size.

    Image b's stream is torch.Generator().manual_seed(seeds[b]) drawing tensors of ``shape`` ([C, H, W]);
    noise_fn(i) returns draw i + 1, and noise_fn(-1) returns draw 0, which equals
    ``sampling.teacher.initial_latents(seeds, shape)`` -- so the initial latents and the step noises form one
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
