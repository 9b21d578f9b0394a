"""Unit tests of the pure LCM math: schedules/grids, parameterization, solvers, guidance, sampling."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from latentcm import parameterization as P
from latentcm.guidance import guidance_from_omega, guidance_scale_embedding, omega_from_guidance
from latentcm.sampling.lcm import lcm_step, per_image_noise, sample_lcm
from latentcm.sampling.teacher import initial_latents
from latentcm.schedules import (alpha_sigma_at, alphas_cumprod, betas_for, lambda_at, lcm_timesteps,
                                skipping_grid, t_at_lambda, validate_timesteps)
from latentcm.solvers import SOLVERS, augmented_step, ddim_step

SRC = Path(__file__).resolve().parents[1] / "src" / "latentcm"
TABLE = alphas_cumprod(betas_for())  # [1000] float64, Stable Diffusion


def gaussian_teacher(s2, table=TABLE):
    """Exact x0_eps_fn for data x0 ~ N(0, s2 I): eps* = sigma x / (alpha^2 s2 + sigma^2), x0* = alpha s2 x / (...)."""
    def fn(x, t):
        a, s = alpha_sigma_at(table, t)
        a, s = P.append_dims(a, x), P.append_dims(s, x)
        v = torch.as_tensor(s2).to(x)
        var = a ** 2 * v + s ** 2
        return a * v * x / var, s * x / var
    return fn


def exact_flow(x_from, t_from, t_to, s2, table=TABLE):
    """PF-ODE solution for Gaussian data: x_t = x_T sqrt(alpha_t^2 s2 + sigma_t^2) / sqrt(alpha_T^2 s2 + sigma_T^2)."""
    (a0, s0), (a1, s1) = alpha_sigma_at(table, t_from), alpha_sigma_at(table, t_to)
    return x_from * ((a1 ** 2 * s2 + s1 ** 2) / (a0 ** 2 * s2 + s0 ** 2)).sqrt()


# ----------------------------------------------------------------------------- module boundaries

def test_math_modules_import_no_heavy_subpackages():
    banned = ("training", "cli", "models", "world")
    for name in ("schedules", "parameterization", "solvers", "guidance", "sampling/lcm"):
        tree = ast.parse((SRC / f"{name}.py").read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                parts = m.split(".")
                assert not any(b in parts for b in banned), f"{name}.py imports {m}"


# ----------------------------------------------------------------------------- grids and timesteps

def test_skipping_grid():
    grid = skipping_grid()
    assert grid.tolist() == [20 * i - 1 for i in range(1, 51)]
    assert skipping_grid(1000, 25)[:3].tolist() == [39, 79, 119]


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("n", range(1, 9))
def test_lcm_timesteps_match_diffusers(n, strength):
    sched = LCMScheduler()
    sched.set_timesteps(n, strength=strength)
    assert lcm_timesteps(n, strength=strength).tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("original, strength", [(50, 0.6), (50, 0.9), (30, 1.0), (45, 1.0), (25, 0.8)])
def test_lcm_timesteps_match_diffusers_all_counts(original, strength):
    for n in range(1, int(original * strength) + 1):
        sched = LCMScheduler()
        sched.set_timesteps(n, original_inference_steps=original, strength=strength)
        got = lcm_timesteps(n, original_inference_steps=original, strength=strength)
        assert got.tolist() == sched.timesteps.tolist(), (original, strength, n)


def test_lcm_timesteps_examples_and_errors():
    assert lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm_timesteps(8).tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    with pytest.raises(ValueError, match=">= 1"):
        lcm_timesteps(0)
    with pytest.raises(ValueError, match="at most 50"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match="at most 25"):
        lcm_timesteps(26, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        lcm_timesteps(4, strength=0.0)


def test_validate_timesteps():
    assert validate_timesteps([999, 499, 19]).tolist() == [999, 499, 19]
    for bad, msg in [([], "non-empty"), ([499, 999], "descending"), ([999, 999], "descending"),
                     ([1000, 19], r"\[0, 999\]"), ([19, -1], r"\[0, 999\]"), ([999.5, 19.0], "integers")]:
        with pytest.raises(ValueError, match=msg):
            validate_timesteps(bad)
    with pytest.warns(UserWarning, match="500"):
        validate_timesteps([999, 500])


def test_continuous_schedule_interpolates_lambda():
    t_int = torch.tensor([0, 19, 500, 999])
    a_i, s_i = alpha_sigma_at(TABLE, t_int)
    a_f, s_f = alpha_sigma_at(TABLE, t_int.double())
    torch.testing.assert_close(a_f, a_i, rtol=1e-12, atol=0)
    torch.testing.assert_close(s_f, s_i, rtol=1e-12, atol=0)
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 999
    torch.testing.assert_close(t_at_lambda(TABLE, lambda_at(TABLE, t)), t, rtol=0, atol=1e-9)
    a, s = alpha_sigma_at(TABLE, t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a))


# ----------------------------------------------------------------------------- parameterization

def test_boundary_scalings_values():
    c_skip, c_out = P.boundary_scalings(torch.tensor([0, 19, 259, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1].item() == pytest.approx(6.925e-6, rel=1e-3)
    assert c_out[1].item() == pytest.approx(0.9999965, abs=1e-7)
    assert c_skip[2].item() == pytest.approx(3.727e-8, rel=1e-3)
    assert c_skip[3].item() == pytest.approx(2.505e-9, rel=1e-3) and c_out[3].item() == pytest.approx(1.0, abs=1e-8)
    sched = LCMScheduler()
    for t in (0, 1, 19, 259, 999):
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        got = P.boundary_scalings(t)
        assert (got[0].item(), got[1].item()) == pytest.approx(ref, rel=1e-12)


def test_consistency_fn_boundary_and_broadcast():
    x, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(P.consistency_fn(x, x0, 0), x)
    t = torch.tensor([0, 19, 999])
    out = P.consistency_fn(x, x0, t)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[2], x0[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_round_trip(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)  # [3, 4, 5, 5] each
    alpha, sigma = alpha_sigma_at(TABLE, torch.tensor([10, 500, 990]))  # [3] per-sample
    x_t = P.append_dims(alpha, x0) * x0 + P.append_dims(sigma, x0) * eps
    out = P.output_from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = P.x0_eps_from_output(out, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(P.x0_from_output(out, x_t, alpha, sigma, prediction_type), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        P.x0_eps_from_output(out, x_t, alpha, sigma, "flow")


# ----------------------------------------------------------------------------- sampling vs LCMScheduler

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcm_step_matches_scheduler_step(prediction_type):
    sched = LCMScheduler(prediction_type=prediction_type)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 8, 8)
    for i, t in enumerate(sched.timesteps):
        sample, model_output = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        ref_prev, ref_denoised = sched.step(model_output, t, sample, generator=torch.Generator().manual_seed(i),
                                            return_dict=False)
        last = i == len(sched.timesteps) - 1
        t_next = None if last else int(sched.timesteps[i + 1])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        prev, denoised = lcm_step(model_output, int(t), sample, t_next, noise, prediction_type=prediction_type,
                                  alpha_bar=sched.alphas_cumprod)  # the same (float32) table
        torch.testing.assert_close(denoised, ref_denoised, rtol=0, atol=1e-5)
        torch.testing.assert_close(prev, ref_prev, rtol=0, atol=1e-5)


def toy_model(x, t):
    """A deterministic stand-in for a UNet output."""
    return 0.3 * x * torch.cos(torch.as_tensor(t, dtype=x.dtype) / 700).reshape(-1, *[1] * (x.ndim - 1)) + 0.05


@pytest.mark.parametrize("steps", [1, 4])
def test_sample_lcm_matches_scheduler_loop(steps):
    sched = LCMScheduler(prediction_type="v_prediction")
    sched.set_timesteps(steps)
    shape = (1, 4, 8, 8)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)  # diffusers: latents and step noise from one generator
    for t in sched.timesteps:
        x, ref = sched.step(toy_model(x, t), t, x, generator=g, return_dict=False)

    table = sched.alphas_cumprod  # float32 table of diffusers

    def f(x, t):  # [B, ...], t [B]
        a, s = alpha_sigma_at(table, t)
        return P.consistency_fn(x, P.x0_from_output(toy_model(x, t), x, a, s, "v_prediction"), t)

    noise_fn = per_image_noise([7], shape[1:])
    seen = []
    out = sample_lcm(f, noise_fn(-1), lcm_timesteps(steps), noise_fn=noise_fn, alpha_bar=table,
                     callback=lambda d: seen.append(d["t"]))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert seen == sched.timesteps.tolist()


def test_per_image_noise_independent_of_batch():
    shape = (4, 3, 3)
    both, alone = per_image_noise([5, 9], shape), per_image_noise([9], shape)
    torch.testing.assert_close(both(-1), initial_latents([5, 9], shape))
    for i in (2, 0, 1):  # any call order
        torch.testing.assert_close(both(i)[1], alone(i)[0])
    assert not torch.equal(both(0), both(1))


# ----------------------------------------------------------------------------- guidance

def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline
    w = torch.tensor([0.0, 1.5, 4.0, 7.5, 14.0])
    for dim in (256, 512, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        got = guidance_scale_embedding(w, dim)
        assert got.shape == (5, dim) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_guidance_convention():
    assert omega_from_guidance(8.5) == 7.5 and guidance_from_omega(8.0) == 9.0
    w = torch.tensor([2.0, 14.0])
    torch.testing.assert_close(guidance_from_omega(omega_from_guidance(w)), w)


# ----------------------------------------------------------------------------- solvers

S2 = torch.tensor([0.05, 0.25, 1.0, 4.0], dtype=torch.float64)  # per-channel data variance


def _integrate(solver, n):
    """n solver steps uniform in lambda from t=999 to t=0 on Gaussian data; relative error vs the exact flow."""
    lam = torch.linspace(lambda_at(TABLE, 999).item(), lambda_at(TABLE, 0).item(), n + 1, dtype=torch.float64)
    ts = t_at_lambda(TABLE, lam)  # [n+1] float64, 999 -> 0
    x = torch.ones(2, 4, dtype=torch.float64)
    x_T, fn = x.clone(), gaussian_teacher(S2)
    for s, t in zip(ts[:-1], ts[1:]):
        x = solver(x, s, t, fn, alpha_bar=TABLE)
    ref = exact_flow(x_T, 999, 0, S2)
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name, lo, hi", [("ddim", 0.7, 1.4), ("dpm-solver", 1.6, 3.0), ("dpm-solver++", 1.6, 3.0)])
def test_solver_order_of_accuracy(name, lo, hi):
    ns = [8, 16, 32, 64]
    errs = [_integrate(SOLVERS[name], n) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert lo <= slope <= hi, (name, errs, slope)
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 0.05


def test_ddim_step_is_paper_formula():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    fn = gaussian_teacher(S2.view(4, 1, 1))
    s, t = torch.tensor([999, 519, 19]), torch.tensor([979, 499, 0])
    (a_s, sg_s), (a_t, sg_t) = alpha_sigma_at(TABLE, s), alpha_sigma_at(TABLE, t)
    eps = fn(x, s)[1]
    c = lambda v: P.append_dims(v, x)  # noqa: E731
    psi = c(a_t / a_s) * x - c(sg_t) * c(sg_s * a_t / (a_s * sg_t) - 1) * eps - x  # LCM Sec. 4.3, DDIM increment
    torch.testing.assert_close(ddim_step(x, s, t, fn, alpha_bar=TABLE), x + psi)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_augmented_step_omega_zero_is_plain_step(name):
    x = torch.randn(2, 4, 3, 3)
    fc, fu = gaussian_teacher(S2.view(4, 1, 1)), gaussian_teacher(2.0)
    got = augmented_step(SOLVERS[name], x, 519, 499, fc, fu, 0.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, SOLVERS[name](x, 519, 499, fc))


def test_augmented_ddim_equals_cfg_combined_step():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fc, fu = gaussian_teacher(S2.view(4, 1, 1)), gaussian_teacher(2.0)
    w = torch.tensor([3.0, 7.5])
    s, t = torch.tensor([519, 999]), torch.tensor([499, 979])

    def f_cfg(x, t):  # diffusers' form: CFG on both x0 and eps (LCM Sec. 4.3, DDIM)
        (x0c, ec), (x0u, eu) = fc(x, t), fu(x, t)
        wb = P.append_dims(w, x)
        return x0c + wb * (x0c - x0u), ec + wb * (ec - eu)

    got = augmented_step(ddim_step, x, s, t, fc, fu, w, alpha_bar=TABLE)
    torch.testing.assert_close(got, ddim_step(x, s, t, f_cfg, alpha_bar=TABLE))
    # second-order solvers differ (each branch has its own midpoint) but are close for a short step
    got2 = augmented_step(SOLVERS["dpm-solver++"], x, s, t, fc, fu, w, alpha_bar=TABLE)
    assert not torch.allclose(got2, got, rtol=0, atol=1e-12)
    assert math.isfinite(got2.abs().max().item())
