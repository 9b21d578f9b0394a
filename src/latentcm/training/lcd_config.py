"""The LCD / LCF / LCM-LoRA variant as data (:class:`LCDConfig`, LCM Algorithm 1 and Sec. 5.1) and the distance
d of Algorithm 1 line 6."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..defaults import GUIDANCE_MODES, OMEGA_RANGE, SKIP
from ..guidance import GUIDANCE_EMBED_DIM
from ..solvers import SOLVERS

LOSSES = ("l2", "huber")
# How the less-noisy point z_{t_n} is made: "solver" = LCD (Algorithm 1 line 5, teacher + ODE solver);
# "same-noise" = LCF (LCM Sec. 4.4): alpha(t_n) z + sigma(t_n) eps with the SAME z and eps as z_{t_{n+k}}.
TARGETS = ("solver", "same-noise")
COND_PROJ_INPUTS = ("all", "smooth")


@dataclass(frozen=True)
class LCDConfig:
    """One LCD variant (LCM Algorithm 1; Sec. 5.1 hyperparameters). w is the paper's guidance (SD guidance scale g = 1 + w)."""

    solver: str = "ddim"               # Psi: ddim | dpm-solver | dpm-solver++
    skip: int = SKIP                   # k, skipping interval; grid t_i = k i - 1, N = T // k points
    omega_min: float = OMEGA_RANGE[0]  # w ~ U[omega_min, omega_max]; the paper's [2, 14]
    omega_max: float = OMEGA_RANGE[1]
    ema_decay: float = 0.95            # mu of the target network (diffusers); the paper's 0.999943 selectable
    student_ema: float = 0.0           # > 0: also keep a slow EMA of the student, exported in its place; 0: off
    cond_proj_lr_scale: float = 1.0    # the w projection (Eq. 9's omega-embedding -> time embedding) at lr x this
    loss: str = "l2"                   # distance d: l2 | huber (pseudo-Huber)
    huber_c: float = 0.001             # c of the pseudo-Huber distance
    batch_size: int = 16               # per process
    seed: int = 0                      # batch seed
    time_cond_proj_dim: int = GUIDANCE_EMBED_DIM  # size of the w embedding fed as timestep_cond
    cond_proj_init: str = "zero"       # init of the w projection: zero (starts as the teacher) | default
    target: str = "solver"             # solver (LCD, needs a teacher) | same-noise (LCF, teacher-free)
    max_timestep: int | None = None    # train only t_{n+k} <= this (LCF: texture lives at low noise); None: all
    guidance_max_t: int | None = None  # teacher guided only where t_{n+k} <= this (guidance interval); None: all t
    cond_proj_inputs: str = "all"      # w-embedding entries the w projection reads: all | smooth (no aliasing ones)
    gradient_checkpointing: bool = False  # memory, not math: the student recomputes activations in backward
    guidance_mode: str = "embedding"   # embedding: w is a student input (LCM Sec. 4.2) | cfg: the unguided ODE
    # (w = 0), no w input; sampled with real CFG over a student that also learnt the empty prompt
    empty_prompt_share: float = 0.0    # share of training captions replaced by the empty prompt (cfg mode: > 0)
    omega_zero_share: float = 0.0      # share of samples at exactly w = 0 (g = 1, the unguided ODE) instead of U
    low_w_skip: int | None = None      # k for the samples with w <= low_w_max (their t_{n+k} on that k's grid);
    low_w_max: float = 0.0             # None: one k for every w (Sec. 4.3's k as a function of w)
    noise_start_share: float = 0.0     # share of samples that start where the sampler does: t_{n+k} = the grid's
    # top point and z_{t_{n+k}} pure noise N(0, I), not data noised to it (which keeps sqrt(alpha_bar_T) of it)
    ode_start_share: float = 0.0       # share of samples whose z_{t_{n+k}} is the teacher's guided ODE (at their
    # w) from pure noise at the top point, ode_start_steps solver steps, instead of data noised to t_{n+k}
    ode_start_steps: int = 2
    ode_pair_share: float = 0.0        # share of samples on the teacher's guided ODE from pure noise (ode_pair_steps
    # DDIM-spaced steps from the top point to t = 0) whose target is that ODE's own end point, not the EMA target
    ode_pair_steps: int = 20           # their input is the state at one of the steps' start points, drawn uniformly
    ode_pair_starts: str = "uniform"   # uniform: over those start points | top: always the top point, pure noise

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not 0 <= self.omega_min <= self.omega_max:
            raise ValueError(f"need 0 <= omega_min <= omega_max, got [{self.omega_min}, {self.omega_max}]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.student_ema < 1.0:
            raise ValueError(f"student_ema must be in [0, 1), got {self.student_ema}")
        if not self.cond_proj_lr_scale > 0:
            raise ValueError(f"cond_proj_lr_scale must be > 0, got {self.cond_proj_lr_scale}")
        if self.huber_c <= 0 or self.batch_size < 1 or self.skip < 1:
            raise ValueError("huber_c must be > 0, batch_size >= 1 and skip >= 1")
        if self.cond_proj_inputs not in COND_PROJ_INPUTS:
            raise ValueError(f"unknown cond_proj_inputs {self.cond_proj_inputs!r}; choose from "
                             f"{', '.join(COND_PROJ_INPUTS)}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance_mode {self.guidance_mode!r}; choose from {', '.join(GUIDANCE_MODES)}")
        if self.guidance_mode == "cfg" and (self.omega_max != 0 or self.cond_proj_inputs != "all"):
            raise ValueError("guidance_mode 'cfg' distils the unguided ODE (w = 0) into a student without a w input: "
                             "it takes no w range or w-projection setting")
        if not 0.0 <= self.empty_prompt_share < 1.0:
            raise ValueError(f"empty_prompt_share must be in [0, 1), got {self.empty_prompt_share}")
        if not 0.0 <= self.omega_zero_share <= 1.0:
            raise ValueError(f"omega_zero_share must be in [0, 1], got {self.omega_zero_share}")
        if self.omega_zero_share > 0 and self.omega_max == 0:
            raise ValueError("omega_zero_share needs a w range (omega_max > 0): every w is 0 already")
        if self.low_w_skip is not None and (self.low_w_skip < 1 or self.omega_max == 0 or self.low_w_max < 0):
            raise ValueError("low_w_skip needs k >= 1, a w range (omega_max > 0) and low_w_max >= 0")
        if not 0.0 <= self.noise_start_share <= 1.0 or (self.noise_start_share > 0 and self.target != "solver"):
            raise ValueError("noise_start_share must be in [0, 1] and needs LCD's solver target (LCF's same-noise "
                             "target is the data noised again)")
        if not 0.0 <= self.ode_start_share <= 1.0 - self.noise_start_share or self.ode_start_steps < 1 or (
                self.ode_start_share > 0 and self.target != "solver"):
            raise ValueError("ode_start_share must be in [0, 1 - noise_start_share], ode_start_steps >= 1, and it "
                             "needs LCD's solver target (a teacher)")
        if not 0.0 <= self.ode_pair_share <= 1.0 - self.noise_start_share - self.ode_start_share or (
                self.ode_pair_steps < 2 or (self.ode_pair_share > 0 and self.target != "solver")):
            raise ValueError("ode_pair_share must be in [0, 1 - noise_start_share - ode_start_share], ode_pair_steps "
                             ">= 2, and it needs LCD's solver target (a teacher)")
        top_alone = self.ode_pair_starts == "top" and not self.ode_pair_share
        if self.ode_pair_starts not in ("uniform", "top") or top_alone:
            raise ValueError(f"ode_pair_starts must be uniform or top (top needs ode_pair_share > 0), got "
                             f"{self.ode_pair_starts!r}")
        if self.guidance_max_t is not None and self.guidance_max_t < 0:
            raise ValueError(f"guidance_max_t must be >= 0, got {self.guidance_max_t}")
        lowest = max(self.skip, self.low_w_skip or 0) - 1
        if self.max_timestep is not None and self.max_timestep < lowest:
            raise ValueError(f"max_timestep {self.max_timestep} leaves no grid point (the lowest is k - 1 = {lowest})")


def draw_omega(cfg: LCDConfig, n: int, g: torch.Generator) -> torch.Tensor:
    """w ~ U[omega_min, omega_max] (Algorithm 1 line 3), with ``omega_zero_share`` of them set to 0 (the unguided
    ODE, g = 1). The zero draw comes after the uniform one and only when the share is > 0, so a share of 0 leaves
    the batch stream of older runs as it was. Returns [n]."""
    omega = cfg.omega_min + (cfg.omega_max - cfg.omega_min) * torch.rand(n, generator=g)  # [n]
    if cfg.omega_zero_share == 0:
        return omega
    return torch.where(torch.rand(n, generator=g) < cfg.omega_zero_share, torch.zeros_like(omega), omega)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """d(x, y): mean squared error, or pseudo-Huber mean(sqrt((x - y)^2 + c^2) - c)  (LCM Algorithm 1)."""
    if kind == "l2":
        return torch.mean((pred - target) ** 2)
    if kind == "huber":
        return torch.mean(torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")

