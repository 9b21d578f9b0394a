"""Mixed precision for the consistency tasks: every UNet output fp32 at the network's boundary
(:class:`Float32Output`), and a warning when a half-precision EMA target cannot move."""
from __future__ import annotations

import logging
import types

import torch

from ..models.denoiser import Denoiser


class Float32Output(torch.nn.Module):
    """A UNet whose floating inputs are cast to ``dtype`` (the stored weights') and whose output is fp32.

    Wraps the network inside a ``Denoiser`` under mixed precision: the network runs in half (the teacher, the
    target) or under autocast (the student), and everything after it -- x0 / eps, c_skip / c_out, the solver,
    the loss -- sees fp32 tensors.
    """

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    @property
    def config(self):
        return self.net.config

    def _cast(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(self.dtype)
        if isinstance(x, dict):
            return {k: self._cast(v) for k, v in x.items()}
        return x

    def forward(self, sample, timestep, **kwargs):
        out = self.net(self._cast(sample), timestep, **{k: self._cast(v) for k, v in kwargs.items()})
        return types.SimpleNamespace(sample=out.sample.float())


def wrap_float32(denoiser: Denoiser, dtype: torch.dtype) -> None:
    if not isinstance(denoiser.unet, Float32Output):
        denoiser.unet = Float32Output(denoiser.unet, dtype)


def warn_slow_ema(decay: float, dtype: torch.dtype) -> None:
    resolution = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # relative spacing of the half format
    if 0 < 1 - decay < resolution:
        logging.getLogger(__name__).warning(
            "warning: EMA rate %g moves the half-precision target by less than its resolution (%g) per step; "
            "it will barely move: use a lower --ema", decay, resolution)

