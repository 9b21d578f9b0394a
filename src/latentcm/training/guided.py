"""Guidance distillation: a w-conditioned student learns its teacher's classifier-free-guided output in ONE pass
(Meng et al. 2023, "On distillation of guided diffusion models", stage 1), as a loop Task.

    L(theta) = E_{z, c, eps, t, w} || eps_theta(z_t, w, c, t) - eps_hat_w(z_t, c, t) ||^2
    eps_hat_w = eps(z_t, c, t) + w (eps(z_t, c, t) - eps(z_t, 0, t))       (CFG, LCM Eq. 6 in eps; g = 1 + w)
    t ~ U{0, ..., T - 1}, w ~ U[w_min, w_max] (w = 0: the conditional, unguided eps)

Why before LCD: in LCD the w input only learns through the consistency target, a weak signal that creeps up the
skipping grid from the boundary; here the CFG output is linear in w and is given at every t, so the w pathway gets
a strong signal everywhere. The result is a diffusion model (not a consistency model) whose UNet takes the same
w embedding (``time_cond_proj_dim``) as an LCM: LCD continues from it (``Job.init_student``) and can use it as a
one-pass guided teacher (``LCDTask(guided_teacher=...)``): one UNet pass per solver stage instead of two.

The loss is taken on eps for every prediction type (x0 and eps are affine in the raw output at fixed z_t, so
the CFG combination is the same in any of them). Batches are a pure function of ``(seed, step)``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .. import schedules
from ..guidance import guidance_scale_embedding
from ..models.denoiser import Denoiser, make_student, restrict_cond_proj
from ..solvers import guide
from .consistency import StudentTask
from .data.tensors import LCDData
from .lcd_config import LCDConfig, distance, draw_omega
from .loop import ema_update, step_generator
from .precision import warn_slow_ema, wrap_float32

PROBE_T = (99, 299, 499, 699, 899)  # where the w-following probe looks
PROBE_OMEGA = 6.5                   # g = 7.5, the SD default


@torch.no_grad()
def cfg_eps(teacher: Denoiser, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
            omega: torch.Tensor) -> torch.Tensor:
    """The teacher's guided eps_c + w (eps_c - eps_0) [B, ...], cond and uncond in one batched pass (LCM Eq. 6)."""
    _, eps = teacher(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([text, uncond.expand_as(text)]))
    eps_c, eps_0 = eps.chunk(2)
    return guide(eps_c, eps_0, omega)


class GuidanceTask(StudentTask):
    """Guidance distillation as a loop Task: frozen teacher, w-conditioned online student (optionally a slow EMA
    of it, exported in its place). ``cfg`` reads omega_min/max, batch_size, seed, time_cond_proj_dim,
    cond_proj_init, cond_proj_inputs, cond_proj_lr_scale, student_ema and loss (l2 | huber on eps).

    Args:
        teacher_unet: the frozen diffusion UNet (eps, v or sample prediction).
        scheduler_config: its diffusers scheduler config.
        data: cached latents and prompt encodings, or a streaming shard source.
        cfg: the settings above.
        student: the online network; by default ``make_student(teacher_unet, ...)`` (w projection zero: it starts
            as the teacher's conditional model at every w).
        preview_fn: preview_fn(student_unet, step, out_dir), e.g. ``w_following_probe``.
    """

    def __init__(self, teacher_unet, scheduler_config: dict, data: LCDData, cfg: LCDConfig, *,
                 student=None, preview_fn=None):
        self.cfg, self.data, self.preview_fn = cfg, data, preview_fn
        self.student_unet = student if student is not None else make_student(
            teacher_unet, cfg.time_cond_proj_dim, cond_proj_init=cfg.cond_proj_init)
        if cfg.gradient_checkpointing:
            self.student_unet.enable_gradient_checkpointing()
        if cfg.cond_proj_inputs == "smooth":
            restrict_cond_proj(self.student_unet, cfg.omega_min, cfg.omega_max)
        self.average_unet = (copy.deepcopy(self.student_unet).requires_grad_(False).eval()
                             if cfg.student_ema > 0 else None)
        self.teacher = Denoiser(teacher_unet.requires_grad_(False).eval(), scheduler_config)
        self.student = Denoiser(self.student_unet, scheduler_config)
        self.alpha_bar = self.student.alpha_bar  # [T] float64
        self.device = self.alpha_bar.device

    def set_precision(self, dtype: torch.dtype) -> None:
        """Mixed precision: the teacher stored in ``dtype``; the student (and its slow EMA) fp32; outputs fp32."""
        self.teacher.unet.to(dtype)
        wrap_float32(self.teacher, dtype)
        self.student_unet.float()
        if self.average_unet is not None:
            self.average_unet.float()
            warn_slow_ema(self.cfg.student_ema, torch.float32)
        wrap_float32(self.student, torch.float32)

    def batch(self, step: int) -> dict:
        """(z, c) from the data, t ~ U{0, ..., T - 1}, w ~ U[w_min, w_max], the noise of z_t."""
        g, b = step_generator(self.cfg.seed, step), self.cfg.batch_size
        if getattr(self.data, "streaming", False):  # shards: batch index -> stream position
            chunk = self.data.batch(step)
            z0, text = chunk.latents, chunk.text_states
        else:
            idx = torch.randint(len(self.data), (b,), generator=g).to(self.data.latents.device)
            z0, text = self.data.latents[idx], self.data.text_states[idx]
        n = len(z0)
        t = torch.randint(len(self.alpha_bar), (n,), generator=g)  # [B]
        noise = torch.randn((n, *z0.shape[1:]), generator=g)  # [B, C, h, w]
        omega = draw_omega(self.cfg, n, g)  # [B]
        out = {"z0": z0, "text": text, "noise": noise, "t": t, "omega": omega}
        return {key: v.to(self.device) for key, v in out.items()}

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """|| eps_theta(z_t, w, c, t) - (eps_c + w (eps_c - eps_0)) ||  (the module docstring's L)."""
        t, omega, text = batch["t"], batch["omega"], batch["text"]
        z_t = schedules.add_noise(batch["z0"], batch["noise"], self.alpha_bar[t])  # [B, C, h, w]
        target = cfg_eps(self.teacher, z_t, t, text, self.data.uncond_states, omega)  # no grad
        w_emb = guidance_scale_embedding(omega, self.cfg.time_cond_proj_dim).to(z_t.dtype)  # [B, d]
        _, eps = self.student(z_t, t, text, w_emb)
        loss = distance(eps.float(), target.float(), self.cfg.loss, self.cfg.huber_c)
        return loss, {"omega_mean": float(omega.mean())}

    def after_update(self, step: int) -> None:
        """The slow EMA of the student, if kept, with the usual warm-up min(decay, (1 + step) / (10 + step))."""
        if self.average_unet is not None:
            ema_update(self.average_unet, self.student_unet, min(self.cfg.student_ema, (1 + step) / (10 + step)))

    def preview(self, step: int, out_dir: Path) -> None:
        if self.preview_fn is not None:
            self.preview_fn(self.student_unet, step, out_dir)


# --- how well the student follows w ---------------------------------------------------------------------

@torch.no_grad()
def w_following(teacher: Denoiser, student: Denoiser, data: LCDData, *, omega: float = PROBE_OMEGA,
                ts=PROBE_T, num: int = 16, seed: int = 1234, dim: int | None = None) -> list[dict]:
    """Per t: how the student's w-difference D_s = eps_s(w) - eps_s(0) compares with the teacher's CFG difference
    D = w (eps_c - eps_0), on ``num`` fixed data latents and noises: {t, norm_ratio |D_s| / |D|, cosine(D_s, D),
    rel_error |eps_s(w) - eps_hat_w| / |eps_hat_w - eps_c|}. A student that follows w has ratio 1 and cosine 1."""
    g = torch.Generator().manual_seed(seed)
    dev = data.latents.device
    z0, text = data.latents[:num], data.text_states[:num]
    dim = dim or student.unet.config.time_cond_proj_dim
    rows = []
    for t_val in ts:
        t = torch.full((len(z0),), int(t_val), dtype=torch.long, device=dev)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        z_t = schedules.add_noise(z0, noise, student.alpha_bar.to(dev)[t])
        w = torch.full((len(z0),), float(omega), device=dev)
        guided = cfg_eps(teacher, z_t, t, text, data.uncond_states, w)
        eps_c = cfg_eps(teacher, z_t, t, text, data.uncond_states, torch.zeros_like(w))
        e_w = student(z_t, t, text, guidance_scale_embedding(w, dim).to(z_t.dtype))[1]
        e_0 = student(z_t, t, text, guidance_scale_embedding(torch.zeros_like(w), dim).to(z_t.dtype))[1]
        d_t, d_s = (guided - eps_c).flatten(), (e_w - e_0).flatten()
        rows.append({"t": int(t_val), "norm_ratio": float(d_s.norm() / d_t.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(d_s, d_t, dim=0)),
                     "rel_error": float((e_w - guided).norm() / (guided - eps_c).norm())})
    return rows


def w_following_probe(teacher: Denoiser, scheduler_config: dict, data: LCDData, log_name: str = "w-following.jsonl"):
    """A ``preview_fn`` appending {step, per_t: w_following(...)} of the student against ``teacher`` (the task's
    frozen teacher Denoiser) to OUT/previews/``log_name`` (JSON lines)."""

    def probe(student_unet, step: int, out_dir: Path) -> None:
        p = next(student_unet.parameters())
        was_training = student_unet.training
        student_unet.eval()
        local = data.to(p.device) if hasattr(data, "latents") else data
        rows = w_following(teacher, Denoiser(student_unet, scheduler_config), local)
        student_unet.train(was_training)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / log_name, "a") as fh:
            fh.write(json.dumps({"step": step, "per_t": rows}) + "\n")
    return probe
