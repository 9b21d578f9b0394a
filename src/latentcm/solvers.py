"""Teacher ODE solvers Psi for latent consistency distillation (LCM Sec. 4.3, DDIM-4.3), next-state form.

A solver maps z_s at s = t_{n+k} to an estimate of z_t at t = t_n along the (teacher) PF-ODE:

    solver(x, s, t, x0_eps_fn, *, alpha_bar=None) -> z_t

``x0_eps_fn(x, t) -> (x0_pred, eps_pred)`` wraps the teacher (see ``parameterization.x0_eps_from_output``).
s and t are integer timesteps (numbers or per-sample [B] tensors). The paper's increment is
Psi = z_t - z_s. Second-order solvers evaluate the teacher at a midpoint u with
lambda_u = (lambda_s + lambda_t) / 2, which is off the integer grid: u is passed to ``x0_eps_fn`` as a
float64 tensor, and alpha_u, sigma_u come from the continuous-time VP schedule obtained by
interpolating lambda = log(alpha/sigma) linearly in t over the discrete table
(``schedules.lambda_at`` / ``schedules.t_at_lambda``). Coefficients are computed in float64 and cast to x.dtype.
"""
from __future__ import annotations

from typing import Callable

import torch

from .parameterization import append_dims
from .schedules import alpha_sigma_at, alpha_sigma_from_lambda, lambda_at, t_at_lambda, table_or_default

X0EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Solver = Callable[..., torch.Tensor]


def ddim_step(x: torch.Tensor, s, t, x0_eps_fn: X0EpsFn, *, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """Psi_DDIM (LCM Sec. 4.3, DDIM), first order: z_t = alpha_t x0(z_s, s) + sigma_t eps(z_s, s).

    Equals the paper's (alpha_t/alpha_s) z_s - sigma_t (sigma_s alpha_t / (alpha_s sigma_t) - 1) eps + z_s
    whenever x0 = (z_s - sigma_s eps) / alpha_s.
    """
    x0, eps = x0_eps_fn(x, s)  # [B, ...] each
    alpha_t, sigma_t = alpha_sigma_at(table_or_default(alpha_bar).to(x.device), t)
    return append_dims(alpha_t, x) * x0 + append_dims(sigma_t, x) * eps  # [B, ...]


def _midpoint(table: torch.Tensor, s, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, lambda_s, u): step size h = lambda_t - lambda_s and the time u with lambda_u = lambda_s + h/2."""
    lam_s, lam_t = lambda_at(table, s), lambda_at(table, t)
    h = lam_t - lam_s
    return h, lam_s, t_at_lambda(table, lam_s + h / 2)


def dpm_solver_2_step(x: torch.Tensor, s, t, x0_eps_fn: X0EpsFn, *,
                      alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver-2 (noise prediction, midpoint r = 1/2 in lambda; LCM Sec. 4.3 and Appendix, DPM-Solver, Lu et al. 2022 Alg. 4).

    z_u = (alpha_u / alpha_s) z_s - sigma_u (e^{h/2} - 1) eps(z_s, s)
    z_t = (alpha_t / alpha_s) z_s - sigma_t (e^{h} - 1) eps(z_u, u)
    """
    table = table_or_default(alpha_bar).to(x.device)  # [T] float64
    h, lam_s, u = _midpoint(table, s, t)
    alpha_s, _ = alpha_sigma_from_lambda(lam_s)
    alpha_u, sigma_u = alpha_sigma_from_lambda(lam_s + h / 2)
    alpha_t, sigma_t = alpha_sigma_from_lambda(lam_s + h)
    _, eps_s = x0_eps_fn(x, s)
    z_u = append_dims(alpha_u / alpha_s, x) * x - append_dims(sigma_u * torch.expm1(h / 2), x) * eps_s
    _, eps_u = x0_eps_fn(z_u, u)
    return append_dims(alpha_t / alpha_s, x) * x - append_dims(sigma_t * torch.expm1(h), x) * eps_u


def dpm_solver_pp_2s_step(x: torch.Tensor, s, t, x0_eps_fn: X0EpsFn, *,
                          alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2S) (data prediction, r = 1/2; LCM Sec. 4.3 and Appendix, DPM-Solver, Lu et al. 2022b Alg. 1).

    z_u = (sigma_u / sigma_s) z_s - alpha_u (e^{-h/2} - 1) x0(z_s, s)
    z_t = (sigma_t / sigma_s) z_s - alpha_t (e^{-h} - 1) x0(z_u, u)
    """
    table = table_or_default(alpha_bar).to(x.device)  # [T] float64
    h, lam_s, u = _midpoint(table, s, t)
    _, sigma_s = alpha_sigma_from_lambda(lam_s)
    alpha_u, sigma_u = alpha_sigma_from_lambda(lam_s + h / 2)
    alpha_t, sigma_t = alpha_sigma_from_lambda(lam_s + h)
    x0_s, _ = x0_eps_fn(x, s)
    z_u = append_dims(sigma_u / sigma_s, x) * x - append_dims(alpha_u * torch.expm1(-h / 2), x) * x0_s
    x0_u, _ = x0_eps_fn(z_u, u)
    return append_dims(sigma_t / sigma_s, x) * x - append_dims(alpha_t * torch.expm1(-h), x) * x0_u


def augmented_step(solver: Solver, x: torch.Tensor, s, t, fn_cond: X0EpsFn, fn_uncond: X0EpsFn, omega, *,
                   alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """Guided solver target z_hat_{t_n} = (1 + w) z'_c - w z'_0  (LCM Algorithm 1 line 5; Eq. 7).

    Next-state form of the paper's increment form z_s + (1 + w) Psi_c - w Psi_0 with Psi = z' - z_s; the two
    are identical for any solver. For DDIM (affine in (x0, eps) at fixed z_s) it also equals ONE DDIM step
    with CFG-combined predictions x0_c + w (x0_c - x0_0), eps_c + w (eps_c - eps_0) (diffusers' form);
    for the second-order solvers it does not, because each branch takes its own midpoint.

    Args:
        solver: one of ``SOLVERS``.
        x: z_{t_{n+k}} [B, ...].
        s, t: t_{n+k} and t_n (numbers or [B]).
        fn_cond, fn_uncond: teacher ``x0_eps_fn`` with the prompt c and with the empty prompt.
        omega: paper guidance w (= SD guidance scale - 1), number or per-sample [B].
        alpha_bar: schedule table [T]; Stable Diffusion's by default.
    """
    z_c = solver(x, s, t, fn_cond, alpha_bar=alpha_bar)  # [B, ...]
    z_0 = solver(x, s, t, fn_uncond, alpha_bar=alpha_bar)
    return guide(z_c, z_0, omega)


def guide(z_c: torch.Tensor, z_0: torch.Tensor, omega) -> torch.Tensor:
    """The paper's CFG combination (1 + w) z_c - w z_0 = z_c + w (z_c - z_0)  (LCM Eq. 6; w number or [B])."""
    return z_c + append_dims(omega, z_c) * (z_c - z_0)


def _twice(s, batch: int):
    """A per-sample time [B] repeated for a [cond; uncond] batch [2B]; numbers and 0-d tensors pass through."""
    return torch.cat([s, s]) if isinstance(s, torch.Tensor) and s.ndim == 1 and len(s) == batch else s


def augmented_step_batched(solver: Solver, x: torch.Tensor, s, t, fn_pair: X0EpsFn, omega, *,
                           alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """``augmented_step`` with both branches in ONE solver run over a doubled batch (LCM Alg. 1 line 5).

    ``fn_pair(x2, t2)`` evaluates the teacher on x2 = [x; x] [2B, ...] with the prompt on the first B rows
    and the empty prompt on the last B, so each solver stage costs one batched forward (DDIM: one call;
    the second-order solvers: two). Every solver here acts on each sample independently, so the result
    equals ``augmented_step(solver, x, s, t, fn_cond, fn_uncond, omega)`` with the matching halves.
    """
    b = x.shape[0]
    z_pair = solver(torch.cat([x, x]), _twice(s, b), _twice(t, b), fn_pair, alpha_bar=alpha_bar)  # [2B, ...]
    z_c, z_0 = z_pair.chunk(2)
    return guide(z_c, z_0, omega)


SOLVERS: dict[str, Solver] = {
    "ddim": ddim_step,
    "dpm-solver": dpm_solver_2_step,
    "dpm-solver++": dpm_solver_pp_2s_step,
}
