"""Where an LCD sample starts: data noised to t_{n+k} (LCM Algorithm 1 line 4), or the sampler's own starts,
pure noise at the grid's top point or the teacher's ODE run from it (``LCDConfig.noise_start_share`` and
``ode_start_share``); and the ODE pairs (``ode_pair_share``), whose target is the teacher's ODE end point."""
from __future__ import annotations

from typing import Callable

import torch

from .lcd_config import LCDConfig


def draw_starts(cfg: LCDConfig, t_start: torch.Tensor, top: torch.Tensor,
                g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(t_{n+k}, pure, ode, pair) [B]: ``noise_start_share`` of the samples moved to the top point, where Algorithm 3
    starts from pure noise, their input that noise; ``ode_start_share`` keep their t_{n+k} and take their input
    from the teacher's ODE out of that noise (at the top point the two are one); ``ode_pair_share`` move to a
    start point of the pair trajectory (``pair_times``), drawn uniformly, or to its top point
    (``ode_pair_starts``). Drawn only when a share is > 0, so shares of 0 leave the batch stream as it was."""
    none = torch.zeros_like(t_start, dtype=torch.bool)
    if cfg.noise_start_share == 0 and cfg.ode_start_share == 0 and cfg.ode_pair_share == 0:
        return t_start, none, none, none
    u = torch.rand(len(t_start), generator=g)  # [B]
    first, second = cfg.noise_start_share, cfg.noise_start_share + cfg.ode_start_share
    pure, ode = u < first, (u >= first) & (u < second)
    pure, ode = pure | (ode & (t_start == top)), ode & (t_start < top)
    t_start = torch.where(pure, top, t_start)
    if cfg.ode_pair_share == 0:
        return t_start, pure, ode, none
    pair = (u >= second) & (u < second + cfg.ode_pair_share)
    if cfg.ode_pair_starts == "top":  # the sampler's first step: pure noise at the top point to the ODE's end
        return torch.where(pair, top, t_start), pure, ode, pair
    on_path = pair_times(top, cfg.ode_pair_steps)[torch.randint(cfg.ode_pair_steps, (len(u),), generator=g)]
    return torch.where(pair, on_path.to(t_start), t_start), pure, ode, pair


def pair_times(top: torch.Tensor, steps: int) -> torch.Tensor:
    """The pair trajectory's time points [steps + 1]: ``steps`` DDIM-trailing steps of equal length from the top
    point, then t = 0 (top 999, 20 steps: 999, 949, ..., 49, 0 -- the k = 50 grid)."""
    top = int(top)
    return torch.tensor([top - i * (top + 1) // steps for i in range(steps)] + [0])


@torch.no_grad()
def ode_pairs(step: Callable, noise: torch.Tensor, t_start: torch.Tensor, top: torch.Tensor,
              steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, end) [B, C, h, w]: the teacher's guided ODE from pure noise at ``top`` through ``pair_times``,
    ``step(z, s, t)`` one guided teacher step; the input is its state at each sample's t_{n+k}, the end its state
    at t = 0. The consistency function's value there is fixed by the ODE alone (self-consistency, LCM Sec. 3: f maps
    every point of a trajectory to its origin), so this target needs no EMA network and no bootstrapping up the grid."""
    times = pair_times(top, steps).to(t_start.device)  # [S + 1]
    states = [noise]
    for s, t in zip(times[:-1], times[1:]):
        states.append(step(states[-1], s.expand_as(t_start), t.expand_as(t_start)))
    where = (times[:-1].unsqueeze(0) == t_start.unsqueeze(1)).int().argmax(1)  # [B]: index of t_{n+k}
    return torch.stack(states)[where, torch.arange(len(t_start))], states[-1]


@torch.no_grad()
def ode_states(step: Callable, noise: torch.Tensor, t_start: torch.Tensor, top: torch.Tensor,
               steps: int) -> torch.Tensor:
    """z_{t_{n+k}} on the teacher's guided ODE from pure noise at ``top``: ``steps`` solver steps of equal length
    in t, ``step(z, s, t)`` being one guided teacher step [B]. The states Algorithm 3's first step meets, which
    data noised to t_{n+k} (still carrying sqrt(alpha_bar) of an image that matches its caption) is not."""
    z, s = noise, torch.full_like(t_start, top)
    for i in range(1, steps + 1):
        t = top - torch.div((top - t_start) * i, steps, rounding_mode="floor")  # [B]; the last is t_start
        z = step(z, s, t)
        s = t
    return z
