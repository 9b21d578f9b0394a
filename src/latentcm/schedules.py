"""Noise schedules of discrete-time (DDPM) latent diffusion; pure functions of their inputs."""
from __future__ import annotations

import warnings

import torch

TRAIN_TIMESTEPS = 1000  # T of Stable Diffusion's DDPM schedule (a scheduler config that does not say)
GRID_POINTS = 50        # N, original_inference_steps of an LCMScheduler that does not say (k = T // N = 20)


def train_timesteps(scheduler_config: dict) -> int:
    """T of a diffusers scheduler config (``num_train_timesteps``; TRAIN_TIMESTEPS where it does not say)."""
    return int(scheduler_config.get("num_train_timesteps", TRAIN_TIMESTEPS))


def img2img_points(original_inference_steps: int, strength: float) -> int:
    """How many points of the skipping grid img2img keeps: int(N * strength), as diffusers' LCMScheduler does."""
    return int(original_inference_steps * strength)


def betas_for(num_train_timesteps: int = TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012,
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
    return alphas_cumprod(betas_for(train_timesteps(cfg), cfg.get("beta_start", 0.00085),
                                    cfg.get("beta_end", 0.012), cfg.get("beta_schedule", "scaled_linear")))


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
    return alpha_bar / (1.0 - alpha_bar)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps, with alpha_bar_t of shape [B]."""
    a = alpha_bar_t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ---------------------------------------------------------------------------------------------
# LCM timestep grids (LCM Sec. 4.3 skipping step k; Algorithm 3 inference timesteps)
# ---------------------------------------------------------------------------------------------

def skipping_grid(num_train_timesteps: int = TRAIN_TIMESTEPS, original_inference_steps: int = GRID_POINTS) -> torch.Tensor:
    """The skipping-step training grid t_i = k*i - 1, i = 1..N, k = T // N (LCM Sec. 4.3; diffusers' LCMScheduler).

    Args:
        num_train_timesteps: T, length of the discrete DDPM schedule.
        original_inference_steps: N, number of grid points (diffusers' ``num_ddim_timesteps``).

    Returns:
        Ascending long tensor [N]; [19, 39, ..., 999] for the defaults (k = 20).
    """
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"original_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                         f"got {original_inference_steps}")
    k = skip_of(num_train_timesteps, original_inference_steps)
    return torch.arange(1, original_inference_steps + 1, dtype=torch.long) * k - 1  # [N]


def grid_size(num_train_timesteps: int, skip: int) -> int:
    """N = T // k, the number of skipping-grid points for interval k (Sec. 4.3); the exported
    ``LCMScheduler`` stores it as ``original_inference_steps``.

    k must satisfy T // (T // k) == k, so that the scheduler rebuilds exactly the training grid;
    ValueError otherwise, naming the nearest valid k.
    """
    n = num_train_timesteps // skip if skip >= 1 else 0
    if n < 1 or num_train_timesteps // n != skip:
        ok = sorted({num_train_timesteps // m for m in range(1, num_train_timesteps + 1)}, key=lambda v: abs(v - skip))
        raise ValueError(f"skip k={skip} does not give a grid that LCMScheduler can rebuild "
                         f"(T // (T // k) != k for T={num_train_timesteps}); nearest valid: {sorted(ok[:2])}")
    return n


def skip_of(num_train_timesteps: int, original_inference_steps: int) -> int:
    """k = T // N, the skipping interval of an N-point grid (the inverse of ``grid_size``)."""
    return num_train_timesteps // original_inference_steps


def training_grid(num_train_timesteps: int, skip: int) -> torch.Tensor:
    """The skipping grid [k - 1, 2k - 1, ..., N k - 1] for interval k (N = ``grid_size``)."""
    return skipping_grid(num_train_timesteps, grid_size(num_train_timesteps, skip))  # [N]


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = TRAIN_TIMESTEPS, original_inference_steps: int = GRID_POINTS,
                  strength: float = 1.0) -> torch.Tensor:
    """Descending inference timesteps, selected from the skipping grid as diffusers' LCMScheduler does (Algorithm 3).

    The grid is truncated to its first int(N * strength) points (img2img), reversed, and indexed at
    floor(linspace(0, len, n, endpoint=False)).

    Args:
        num_inference_steps: n, number of sampling steps (1 <= n <= grid length).
        num_train_timesteps: T.
        original_inference_steps: N, size of the skipping grid (k = T // N).
        strength: fraction of the grid kept, in (0, 1]; 1.0 for text-to-image.

    Returns:
        Descending long tensor [n]; 4 steps give [999, 759, 499, 259] on the default 50-point grid (k = 20),
        [999, 749, 499, 249] on the shipped LCM's 20-point grid (k = 50) and [999, 799, 499, 299] on a 10-point
        grid (k = 100, the LCM shipped before it).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    grid = skipping_grid(num_train_timesteps, original_inference_steps)[: img2img_points(original_inference_steps, strength)]
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if num_inference_steps > len(grid):
        raise ValueError(f"num_inference_steps={num_inference_steps} exceeds the {len(grid)} points of the skipping "
                         f"grid (original_inference_steps={original_inference_steps}, strength={strength}); "
                         f"use at most {len(grid)} steps or raise original_inference_steps/strength")
    grid = grid.flip(0)  # [L] descending
    # float64 i * (L / n), as np.linspace computes it, so the floor matches diffusers bit for bit
    idx = (torch.arange(num_inference_steps, dtype=torch.float64) * (len(grid) / num_inference_steps)).floor()
    return grid[idx.long()]  # [n]


def refine_timesteps(num_inference_steps: int, num_train_timesteps: int = TRAIN_TIMESTEPS,
                     original_inference_steps: int = GRID_POINTS) -> torch.Tensor:
    """Descending LCM inference timesteps that spend every step after the first at low noise.

    Step 1 is the top of the skipping grid (T - 1, pure noise); the other n - 1 are evenly spaced in t from
    the grid's midpoint (its largest point below T / 2) down to its lowest point k - 1, rounded to integers
    (on the grid whenever the spacing allows: 4 steps on the 10-point grid give [999, 499, 299, 99]).
    1 and 2 steps equal diffusers' selection ([999], [999, 499]).

    Why (our measurement, not the paper's): every step of Algorithm 3 re-applies the guided consistency
    function; re-noised to t >= T / 2 it acts where guidance inflates objects, so the diffusers selection
    (4 steps on the 10-point grid: [999, 799, 499, 299]) gets worse with more steps while this one stays flat
    (docs/diagnosis-guidance.md).

    Args:
        num_inference_steps: n, 1 <= n <= N.
        num_train_timesteps: T.
        original_inference_steps: N, size of the skipping grid (k = T // N).

    Returns:
        Descending long tensor [n].
    """
    grid = skipping_grid(num_train_timesteps, original_inference_steps)  # [N] ascending
    if not 1 <= num_inference_steps <= len(grid):
        raise ValueError(f"num_inference_steps must be in 1..{len(grid)} (the skipping grid's points), "
                         f"got {num_inference_steps}")
    mid = grid[grid < num_train_timesteps / 2].max() if (grid < num_train_timesteps / 2).any() else grid[-1]
    rest = torch.linspace(float(mid), float(grid[0]), num_inference_steps - 1, dtype=torch.float64).round().long()
    out = torch.cat([grid[-1:], rest])  # [n]
    if (out[1:] >= out[:-1]).any():  # a grid too coarse to split: fall back to diffusers' selection
        return lcm_timesteps(num_inference_steps, num_train_timesteps, original_inference_steps)
    return out


def validate_timesteps(timesteps, num_train_timesteps: int = TRAIN_TIMESTEPS,
                       original_inference_steps: int | None = GRID_POINTS) -> torch.Tensor:
    """Check an explicit inference schedule: non-empty, integer, strictly descending, inside [0, T).

    Warns (does not fail) when a timestep is off the skipping grid the student was distilled on;
    pass ``original_inference_steps=None`` to skip that check.

    Returns:
        The schedule as a descending long tensor [n].
    """
    t = torch.as_tensor(timesteps)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"timesteps must be integers, got {t.tolist()}")
    t = t.long()
    if (t[1:] >= t[:-1]).any():
        raise ValueError(f"timesteps must be strictly descending, got {t.tolist()}")
    if t[0] >= num_train_timesteps or t[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {t.tolist()}")
    if original_inference_steps is not None:
        grid = skipping_grid(num_train_timesteps, original_inference_steps)
        off = t[~torch.isin(t, grid)].tolist()
        if off:
            warnings.warn(f"timesteps {off} are not on the distillation grid (k = "
                          f"{num_train_timesteps // original_inference_steps}); results may degrade", stacklevel=2)
    return t


# ---------------------------------------------------------------------------------------------
# Continuous-time VP schedule from the discrete table (LCM Sec. 4.3 and Appendix, DPM-Solver: midpoints are off-grid)
# lambda_t = log(alpha_t / sigma_t) is interpolated linearly in t between integer timesteps;
# alpha_t^2 = sigmoid(2 lambda_t), sigma_t^2 = sigmoid(-2 lambda_t), so alpha_t^2 + sigma_t^2 = 1.
# ---------------------------------------------------------------------------------------------

def table_or_default(alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
    """The given alpha_bar table [T] as float64, or Stable Diffusion's (scaled_linear 0.00085 -> 0.012)."""
    return alphas_cumprod(betas_for()) if alpha_bar is None else alpha_bar.double()


def lambdas(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Half log-SNR lambda = log(alpha / sigma) = (log alpha_bar - log(1 - alpha_bar)) / 2, elementwise, float64.

    Of the whole table [T] it is decreasing in t. (Per-call code evaluates it only on gathered entries:
    a vectorised log over [T] costs milliseconds when intra-op threads are contended.)
    """
    alpha_bar = alpha_bar.double()
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


def _table_for(alpha_bar: torch.Tensor, t) -> torch.Tensor:
    """alpha_bar as float64 on t's device when t is a tensor (device comes from the inputs)."""
    return alpha_bar.to(t.device, torch.float64) if isinstance(t, torch.Tensor) else alpha_bar.double()


def _time(t, device: torch.device) -> torch.Tensor:
    """t (number or tensor, any shape) as a tensor on ``device``; floats become float64."""
    t = torch.as_tensor(t, device=device)
    return t.double() if t.is_floating_point() else t


def lambda_at(alpha_bar: torch.Tensor, t) -> torch.Tensor:
    """lambda(t) for integer or float t (any shape), piecewise linear in t between table entries."""
    table = _table_for(alpha_bar, t)  # [T]
    t = _time(t, table.device).double()
    lo = t.floor().clamp(0, len(table) - 2)  # linear extrapolation outside [0, T-1]
    frac = t - lo
    lam_lo, lam_hi = lambdas(table[lo.long()]), lambdas(table[lo.long() + 1])
    return lam_lo + frac * (lam_hi - lam_lo)  # shape of t


def t_at_lambda(alpha_bar: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Inverse of ``lambda_at``: the float64 time t with lambda(t) = lam (any shape)."""
    ab_up = _table_for(alpha_bar, lam).flip(0)  # [T] increasing; index j <-> t = T-1-j
    lam = lam.to(ab_up)
    j = torch.searchsorted(ab_up, torch.sigmoid(2 * lam).contiguous()).clamp(1, len(ab_up) - 1)
    lam_lo, lam_hi = lambdas(ab_up[j - 1]), lambdas(ab_up[j])
    frac = (lam - lam_lo) / (lam_hi - lam_lo)
    return (len(ab_up) - 1) - (j - 1 + frac)  # shape of lam


def alpha_sigma_from_lambda(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP (alpha, sigma) with log(alpha/sigma) = lam: alpha = sqrt(sigmoid(2 lam)), sigma = sqrt(sigmoid(-2 lam))."""
    return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()


def alpha_sigma_at(alpha_bar: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t), float64, shaped like t: table lookup for integer t, lambda interpolation for float t."""
    alpha_bar = _table_for(alpha_bar, t)
    t = _time(t, alpha_bar.device)
    if t.is_floating_point():
        return alpha_sigma_from_lambda(lambda_at(alpha_bar, t))
    a = alpha_bar[t]
    return a.sqrt(), (1 - a).sqrt()


# ---------------------------------------------------------------------------------------------
# Scheduler configs: what a teacher's config means, and the LCMScheduler an LCM is exported with
# ---------------------------------------------------------------------------------------------

# Teacher schedule keys the LCMScheduler shares (the betas and what the network predicts).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def check_schedule(scheduler_config: dict) -> None:
    """Refuse schedules that ``schedules.alphas_cumprod_from_config`` would silently misread."""
    if scheduler_config.get("trained_betas") is not None or scheduler_config.get("rescale_betas_zero_snr"):
        raise ValueError("teachers with trained_betas or rescale_betas_zero_snr are not supported")


def lcm_scheduler_config(teacher_scheduler_config: dict, skip: int) -> dict:
    """LCMScheduler config: the teacher's betas and prediction type, the training grid (N = T // k), s = 10."""
    from .parameterization import TIMESTEP_SCALING

    check_schedule(teacher_scheduler_config)
    base = {k: teacher_scheduler_config[k] for k in SCHEDULE_KEYS if k in teacher_scheduler_config}
    num_train = train_timesteps(base)
    return {**base, "original_inference_steps": grid_size(num_train, skip), "timestep_scaling": TIMESTEP_SCALING,
            "clip_sample": False}
