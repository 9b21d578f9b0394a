"""Noise schedules of discrete-time (DDPM) latent diffusion; pure functions of their inputs."""
from __future__ import annotations

import torch


def betas_for(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
              beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """The beta table [T] in float64 ("scaled_linear" is Stable Diffusion's)."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)  [T]."""
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """alpha_bar from a diffusers scheduler config dict."""
    return alphas_cumprod(betas_for(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.00085),
                                    cfg.get("beta_end", 0.012), cfg.get("beta_schedule", "scaled_linear")))


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
    return alpha_bar / (1.0 - alpha_bar)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps, with alpha_bar_t of shape [B]."""
    a = alpha_bar_t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
