"""The LCM consistency parameterization, written once (LCM Sec. 4.1).

f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x0_pred(z_t, t)   (LCM Sec. 4.1)

Glossary: ``t`` integer DDPM timestep 0..T-1; ``alpha_t``, ``sigma_t`` VP coefficients
(alpha_t^2 = alpha_bar_t, sigma_t^2 = 1 - alpha_bar_t); ``x0_pred`` / ``eps_pred`` the data and
noise estimates. Coefficients may be numbers, 0-d tensors or per-sample [B] tensors; they are
broadcast against x [B, ...] by ``append_dims`` and cast to x's dtype and device.
"""
from __future__ import annotations

import torch

SIGMA_DATA = 0.5          # sigma_d in c_skip / c_out (LCM Sec. 4.1, Eq. 5)
TIMESTEP_SCALING = 10.0   # s: c_skip/c_out use s*t ("t / 0.1" in the authors' code)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def append_dims(c, x: torch.Tensor) -> torch.Tensor:
    """Scalar or per-sample coefficient (number, [] or [B]) -> broadcastable against x [B, ...], x's dtype/device."""
    c = c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64)
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(*c.shape, *([1] * (x.ndim - c.ndim)))


def boundary_scalings(t, *, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t) = sd^2 / ((s t)^2 + sd^2), c_out(t) = s t / sqrt((s t)^2 + sd^2)  (LCM Sec. 4.1, Eq. 5).

    Args:
        t: integer timestep(s), number or tensor of any shape.
        sigma_data: sd.
        timestep_scaling: s.

    Returns:
        (c_skip, c_out) float64 tensors shaped like t; (1, 0) at t = 0.
    """
    st = torch.as_tensor(t).double() * timestep_scaling
    denom = st ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, st / denom.sqrt()


def consistency_fn(x_t: torch.Tensor, x0_pred: torch.Tensor, t, *, sigma_data: float = SIGMA_DATA,
                   timestep_scaling: float = TIMESTEP_SCALING) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred  (LCM Sec. 4.1; x_t, x0_pred: [B, ...], t: number or [B])."""
    c_skip, c_out = boundary_scalings(t, sigma_data=sigma_data, timestep_scaling=timestep_scaling)
    return append_dims(c_skip, x_t) * x_t + append_dims(c_out, x_t) * x0_pred  # [B, ...]


def x0_eps_from_output(model_output: torch.Tensor, x_t: torch.Tensor, alpha_t, sigma_t,
                       prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """Data and noise estimates (x0_pred, eps_pred) from a network output (LCM Sec. 4.1).

    epsilon: x0 = (x - sigma eps) / alpha;  sample: eps = (x - alpha x0) / sigma;
    v_prediction: x0 = alpha x - sigma v, eps = alpha v + sigma x.

    Args:
        model_output: network output [B, ...] of kind ``prediction_type``.
        x_t: the noisy input [B, ...].
        alpha_t, sigma_t: VP coefficients at the input's timestep (number, [] or [B]).
        prediction_type: one of ``PREDICTION_TYPES``.
    """
    a, s = append_dims(alpha_t, x_t), append_dims(sigma_t, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x_t - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output, a * model_output + s * x_t
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def x0_from_output(model_output: torch.Tensor, x_t: torch.Tensor, alpha_t, sigma_t,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """x0_pred only (LCM Sec. 4.1 / LCM Sec. 4.1); see ``x0_eps_from_output``."""
    return x0_eps_from_output(model_output, x_t, alpha_t, sigma_t, prediction_type)[0]


def output_from_x0_eps(x0_pred: torch.Tensor, eps_pred: torch.Tensor, alpha_t, sigma_t,
                       prediction_type: str = "epsilon") -> torch.Tensor:
    """Inverse of ``x0_eps_from_output``: the network output (eps, x0 or v = alpha eps - sigma x0) for a pair."""
    if prediction_type == "epsilon":
        return eps_pred
    if prediction_type == "sample":
        return x0_pred
    if prediction_type == "v_prediction":
        return append_dims(alpha_t, eps_pred) * eps_pred - append_dims(sigma_t, x0_pred) * x0_pred
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
