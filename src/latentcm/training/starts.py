"""Where an LCD sample starts: data noised to t_{n+k} (LCM Algorithm 1 line 4), or the sampler's own starts,
pure noise at the grid's top point or the teacher's ODE run from it (``LCDConfig.noise_start_share`` and
``ode_start_share``)."""
from __future__ import annotations

from typing import Callable

import torch

from .lcd_config import LCDConfig


def draw_starts(cfg: LCDConfig, t_start: torch.Tensor, top: torch.Tensor,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t_{n+k}, pure, ode) [B]: ``noise_start_share`` of the samples moved to the top point, where Algorithm 3
    starts from pure noise, their input that noise; ``ode_start_share`` keep their t_{n+k} and take their input
    from the teacher's ODE out of that noise (at the top point the two are one). Drawn only when a share is > 0,
    so shares of 0 leave the batch stream as it was."""
    none = torch.zeros_like(t_start, dtype=torch.bool)
    if cfg.noise_start_share == 0 and cfg.ode_start_share == 0:
        return t_start, none, none
    u = torch.rand(len(t_start), generator=g)  # [B]
    pure = u < cfg.noise_start_share
    ode = (u >= cfg.noise_start_share) & (u < cfg.noise_start_share + cfg.ode_start_share)
    pure, ode = pure | (ode & (t_start == top)), ode & (t_start < top)
    return torch.where(pure, top, t_start), pure, ode


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
