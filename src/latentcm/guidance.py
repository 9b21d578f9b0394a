"""Guidance-scale conditioning of the LCM student (LCM Sec. 4.2, Eq. 6).

Convention: the paper writes CFG as eps_w = (1 + w) eps_c - w eps_0, so w = 0 is unguided. The usual
Stable Diffusion / Imagen guidance scale is g = 1 + w. The student is conditioned on the embedding of
the paper's w; diffusers' LatentConsistencyModelPipeline converts its ``guidance_scale`` g to w = g - 1
(the authors' original community pipeline embedded g directly). Paper "w = 8" is g = 9.
"""
from __future__ import annotations

import math

import torch

GUIDANCE_EMBED_DIM = 256  # time_cond_proj_dim of LCM_Dreamshaper_v7 and the distillation scripts


def omega_from_guidance(g):
    """Paper guidance w from an SD/Imagen guidance scale g: w = g - 1 (LCM Eq. 6)."""
    return g - 1


def guidance_from_omega(w):
    """SD/Imagen guidance scale g from the paper's w: g = 1 + w."""
    return w + 1


def guidance_scale_embedding(w: torch.Tensor, dim: int = GUIDANCE_EMBED_DIM,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of the paper's w (LCM Sec. 4.2, following Meng et al.; VDM ``get_timestep_embedding`` of 1000 w).

    emb = [sin(1000 w f_j), cos(1000 w f_j)], f_j = exp(-j ln(10000) / (dim/2 - 1)), j < dim/2;
    zero-padded to ``dim`` when dim is odd. Equals diffusers'
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.

    Args:
        w: paper guidance values [B].
        dim: embedding size (the UNet's ``time_cond_proj_dim``), >= 4.
        dtype: output dtype (frequencies and products are computed in it).

    Returns:
        [B, dim] tensor on w's device.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    half = dim // 2
    log_step = torch.tensor(math.log(10000.0), dtype=torch.float32) / (half - 1)
    freqs = torch.exp(-log_step * torch.arange(half, dtype=dtype)).to(w.device)  # [half]
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # [B, 2 half]
    return torch.nn.functional.pad(emb, (0, dim - 2 * half))  # [B, dim]


def interval_omega(omega, t, max_t: int | None):
    """Guidance in a limited interval (Kynkaanniemi et al. 2024, arXiv 2404.07724): the paper's w where
    t <= max_t, 0 (the conditional, unguided ODE) above it; max_t None guides every t (LCM Eq. 6 as written).

    Args:
        omega: paper guidance w, a number or per-sample [B].
        t: the timestep the guided evaluation is made at, a number or per-sample [B].
        max_t: highest guided timestep, or None.

    Returns:
        w where guided, else 0: a float for numbers, else a tensor shaped like the broadcast of omega and t.
    """
    if max_t is None:
        return omega
    if not isinstance(omega, torch.Tensor) and not isinstance(t, torch.Tensor):
        return float(omega) if int(t) <= max_t else 0.0
    omega = torch.as_tensor(omega, dtype=torch.float32)
    t = torch.as_tensor(t, device=omega.device)
    return torch.where(t <= max_t, omega, torch.zeros_like(omega))


def smooth_embedding_mask(dim: int, omega_min: float, omega_max: float) -> torch.Tensor:
    """Which entries of ``guidance_scale_embedding`` vary smoothly over w in [omega_min, omega_max]: [dim] bool.

    Entry j (and its cosine twin) is sin(1000 w f_j); its phase turns by 1000 f_j (omega_max - omega_min) over
    the range. Where that exceeds pi the entry aliases -- nearby w values get unrelated values -- so a linear
    map of it cannot carry a smooth function of w, only noise. Kept: the frequencies whose phase turns by at
    most pi (for [1, 8] and dim 256: the 21 lowest of 128). The zero padding of an odd dim is never kept.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))  # [half]
    keep = 1000.0 * freqs * (omega_max - omega_min) <= math.pi  # [half]
    return torch.cat([keep, keep, torch.zeros(dim - 2 * half, dtype=torch.bool)])  # [dim]: sin half, cos half, pad
