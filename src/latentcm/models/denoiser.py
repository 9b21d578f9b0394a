"""One denoiser interface over any diffusers ``UNet2DConditionModel``, and the LCM student.

    Denoiser(unet, scheduler_config)(z_t, t, text_states, w_emb=None) -> (x0_pred, eps_pred)
    ConsistencyModel(denoiser)(z_t, t, text_states, w_emb=None)     -> f(z_t, t) = c_skip z_t + c_out x0_pred

The prediction type (epsilon / v_prediction / sample) and the alpha_bar table come from the teacher's
scheduler config; the conversions and the consistency function are those of ``parameterization``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import parameterization as P
from ..errors import ModelError
from ..guidance import smooth_embedding_mask
from ..registry import safetensors_files
from ..schedules import alpha_sigma_at, alphas_cumprod_from_config, check_schedule  # noqa: F401 (re-export)
from .sdxl import unet_forward

COND_PROJ_KEY = "time_embedding.cond_proj.weight"  # the omega-embedding projection (LCM Sec. 4.2)
LINEAR_1_BIAS = "time_embedding.linear_1.bias"


class Denoiser(torch.nn.Module):
    """A UNet adapted to (z_t, t, text_states, w_emb) -> (x0_pred, eps_pred)  (LCM Sec. 4.1).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (teacher or student).
        scheduler_config: the diffusers scheduler config the UNet was trained with (betas, prediction_type).
    """

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict):
        super().__init__()
        check_schedule(scheduler_config)
        self.unet = unet
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in P.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {P.PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.alpha_bar = alphas_cumprod_from_config(scheduler_config)  # [T] float64; a plain attribute, never cast

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor,
                w_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t [B, C, H, W], t [B] (long on the grid, float64 off it), text_states [B, L, D] (SDXL: the packed
        conditioning of ``sdxl.pack_condition``), w_emb [B, d] or None."""
        t_net = t.float() if t.is_floating_point() else t  # the UNet embeds t in float32 anyway
        out = unet_forward(self.unet, z_t, t_net, text_states, w_emb).sample  # [B, C, H, W]; SDXL: packed cond
        alpha_t, sigma_t = alpha_sigma_at(self.alpha_bar, t)  # float64 [B]
        return P.x0_eps_from_output(out, z_t, alpha_t, sigma_t, self.prediction_type)


class ConsistencyModel(torch.nn.Module):
    """f_theta(z_t, w, c, t) = c_skip(t) z_t + c_out(t) x0_pred(z_t, w, c, t)  (LCM Sec. 4.1-4.2)."""

    def __init__(self, denoiser: Denoiser, *, sigma_data: float = P.SIGMA_DATA,
                 timestep_scaling: float = P.TIMESTEP_SCALING):
        super().__init__()
        self.denoiser, self.sigma_data, self.timestep_scaling = denoiser, sigma_data, timestep_scaling

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor,
                w_emb: torch.Tensor | None = None) -> torch.Tensor:
        x0_pred, _ = self.denoiser(z_t, t, text_states, w_emb)  # [B, C, H, W]
        return P.consistency_fn(z_t, x0_pred, t, sigma_data=self.sigma_data, timestep_scaling=self.timestep_scaling)


def restrict_cond_proj(unet, omega_min: float, omega_max: float) -> None:
    """Let the w projection read only the w-embedding entries that are smooth over [omega_min, omega_max]
    (``guidance.smooth_embedding_mask``): the other columns of ``time_embedding.cond_proj`` are zeroed and a
    gradient hook keeps them zero, so Adam cannot turn aliasing features into noise in the time embedding. The
    weight keeps its shape: exports load in diffusers unchanged."""
    proj = unet.time_embedding.cond_proj
    if proj is None or omega_min == omega_max:
        raise ValueError("cond_proj_inputs 'smooth' needs a w projection and a w range (omega_min < omega_max)")
    keep = smooth_embedding_mask(proj.in_features, omega_min, omega_max).to(proj.weight.device)  # [d]
    with torch.no_grad():
        proj.weight[:, ~keep] = 0
    proj.weight.register_hook(lambda grad: grad * keep.to(grad.dtype))


def make_student(teacher_unet: torch.nn.Module, time_cond_proj_dim: int = 256, *,
                 cond_proj_init: str = "zero") -> torch.nn.Module:
    """The LCM student: the teacher's UNet plus an omega-embedding input (LCM Sec. 4.2).

    Built from the teacher's config with ``time_cond_proj_dim`` added; every teacher weight is loaded
    (strictly, apart from the new layer). ``cond_proj_init="zero"`` zero-initialises
    ``time_embedding.cond_proj``, so at step 0 the student computes exactly the teacher's output whatever
    w is; ``"default"`` keeps PyTorch's init there, as diffusers' distillation scripts do.

    Args:
        teacher_unet: a diffusers ``UNet2DConditionModel`` without ``time_cond_proj_dim``.
        time_cond_proj_dim: size d of the omega embedding (``guidance.GUIDANCE_EMBED_DIM``).
        cond_proj_init: "zero" or "default" (see above).

    Returns:
        A new ``UNet2DConditionModel`` on the teacher's device and dtype, in train mode.
    """
    from diffusers import UNet2DConditionModel

    if teacher_unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError("the teacher UNet already has time_cond_proj_dim; distil from a plain diffusion UNet")
    if time_cond_proj_dim < 4:
        raise ValueError(f"time_cond_proj_dim must be >= 4, got {time_cond_proj_dim}")
    if cond_proj_init not in ("zero", "default"):
        raise ValueError(f"cond_proj_init must be 'zero' or 'default', got {cond_proj_init!r}")
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if set(missing) != {COND_PROJ_KEY} or unexpected:
        raise ValueError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    if cond_proj_init == "zero":
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    p = next(teacher_unet.parameters())
    student.to(p.device)
    if student.dtype != p.dtype:
        student.to(p.dtype)
    return student.train()


def student_weights(folder) -> list[Path]:
    """The safetensors files of an LCM folder's UNet (``folder/unet`` or ``folder`` itself); ModelError if none."""
    folder = Path(folder)
    return safetensors_files(folder / "unet" if (folder / "unet").is_dir() else folder)


def load_student(folder, teacher_unet: torch.nn.Module, time_cond_proj_dim: int = 256) -> torch.nn.Module:
    """An LCM's UNet as the starting student: continue a distillation (e.g. on a new lr schedule).

    ``folder`` is an LCM pipeline folder (its ``unet/``) or a UNet folder, safetensors only. The weights go
    into ``make_student(teacher_unet, time_cond_proj_dim)`` strictly, so the LCM must have the teacher's
    architecture and this size of w embedding; its dtype becomes the teacher's.

    Raises:
        ModelError: the folder is missing, holds no safetensors UNet, or does not fit the teacher.
    """
    from safetensors.torch import load_file

    state = {k: v for f in student_weights(folder) for k, v in load_file(f).items()}  # sharded or single file
    student = make_student(teacher_unet, time_cond_proj_dim)
    ref = student.state_dict()
    bad = sorted(set(ref) ^ set(state)) + [k for k in ref if k in state and ref[k].shape != state[k].shape]
    if bad:
        raise ModelError(f"{folder} does not fit the teacher with a {time_cond_proj_dim}-wide w embedding "
                         f"(first mismatch: {bad[0]})")
    student.load_state_dict(state)  # copies into the teacher's dtype
    return student


def fold_omega(state: dict[str, torch.Tensor], omega: float) -> dict[str, torch.Tensor]:
    """A w-conditioned UNet's state dict at one fixed w, without the w input: diffusers' time embedding computes
    linear_1(t_emb + cond_proj(e(w))) = W1 t_emb + (b1 + W1 cond_proj(e(w))), so folding W1 cond_proj(e(w)) into
    linear_1's bias and dropping ``cond_proj`` is exact at that w (LCM Sec. 4.2; e = the w embedding)."""
    from ..guidance import guidance_scale_embedding

    state = dict(state)
    cond_proj = state.pop(COND_PROJ_KEY)  # [C, d], no bias
    emb = guidance_scale_embedding(torch.tensor([float(omega)]), cond_proj.shape[1])[0]  # [d]
    shift = cond_proj.double() @ emb.double()  # cond_proj(e(w)) [C]
    weight, bias = state["time_embedding.linear_1.weight"], state[LINEAR_1_BIAS]
    state[LINEAR_1_BIAS] = (bias.double() + weight.double() @ shift).to(bias.dtype)
    return state


def fold_w_input(unet: torch.nn.Module, omega: float) -> torch.nn.Module:
    """A UNet without ``time_cond_proj_dim`` that computes ``unet`` at the fixed paper guidance ``omega``
    (``fold_omega``): e.g. an LCM at w = 0 as the start of a real-CFG student."""
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=None)
    plain.load_state_dict(fold_omega(unet.state_dict(), omega))
    p = next(unet.parameters())
    return plain.to(p.device, p.dtype).train(unet.training)


def load_plain_student(folder, teacher_unet: torch.nn.Module) -> torch.nn.Module:
    """An LCM's UNet as a student WITHOUT a w input (the real-CFG mode): a w-conditioned LCM is folded at w = 0
    (the unguided ODE it starts from), a plain one loads as it is. ModelError when it does not fit the teacher."""
    from safetensors.torch import load_file

    state = {k: v for f in student_weights(folder) for k, v in load_file(f).items()}
    if COND_PROJ_KEY in state:
        dim = state[COND_PROJ_KEY].shape[1]
        return fold_w_input(load_student(folder, teacher_unet, dim), 0.0)
    import copy

    student = copy.deepcopy(teacher_unet)
    ref = student.state_dict()
    bad = sorted(set(ref) ^ set(state)) + [k for k in ref if k in state and ref[k].shape != state[k].shape]
    if bad:
        raise ModelError(f"{folder} does not fit the teacher (first mismatch: {bad[0]})")
    student.load_state_dict(state)
    return student.train().requires_grad_(True)
