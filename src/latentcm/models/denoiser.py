"""One denoiser interface over any diffusers ``UNet2DConditionModel`` (style rule 4), and the LCM student.

    Denoiser(unet, scheduler_config)(z_t, t, text_states, w_emb=None) -> (x0_pred, eps_pred)
    ConsistencyModel(denoiser)(z_t, t, text_states, w_emb=None)     -> f(z_t, t) = c_skip z_t + c_out x0_pred

The prediction type (epsilon / v_prediction / sample) and the alpha_bar table come from the teacher's
scheduler config; the conversions and the consistency function are those of ``parameterization``.
"""
from __future__ import annotations

import torch

from .. import parameterization as P
from ..guidance import guidance_scale_embedding
from ..lcm_sampling import per_image_noise, renoise, sample_lcm
from ..schedules import alpha_sigma_at, alphas_cumprod_from_config, lcm_timesteps
from .sdxl import unet_forward

COND_PROJ_KEY = "time_embedding.cond_proj.weight"  # the omega-embedding projection (paper-spec §6)


def check_schedule(scheduler_config: dict) -> None:
    """Refuse schedules that ``schedules.alphas_cumprod_from_config`` would silently misread."""
    if scheduler_config.get("trained_betas") is not None or scheduler_config.get("rescale_betas_zero_snr"):
        raise ValueError("teachers with trained_betas or rescale_betas_zero_snr are not supported")


class Denoiser(torch.nn.Module):
    """A UNet adapted to (z_t, t, text_states, w_emb) -> (x0_pred, eps_pred)  (paper-spec §2.1).

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


def make_student(teacher_unet: torch.nn.Module, time_cond_proj_dim: int = 256) -> torch.nn.Module:
    """The LCM student: the teacher's UNet plus an omega-embedding input (paper-spec §6; issue 3 item 2).

    Built from the teacher's config with ``time_cond_proj_dim`` added; every teacher weight is loaded
    (strictly, apart from the new layer), and ``time_embedding.cond_proj`` is zero-initialised, so at
    step 0 the student computes exactly the teacher's output whatever w is. (The diffusers scripts keep
    PyTorch's default init there; zero-init is this project's choice.)

    Args:
        teacher_unet: a diffusers ``UNet2DConditionModel`` without ``time_cond_proj_dim``.
        time_cond_proj_dim: size d of the omega embedding (``guidance.GUIDANCE_EMBED_DIM``).

    Returns:
        A new ``UNet2DConditionModel`` on the teacher's device and dtype, in train mode.
    """
    from diffusers import UNet2DConditionModel

    if teacher_unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError("the teacher UNet already has time_cond_proj_dim; distil from a plain diffusion UNet")
    if time_cond_proj_dim < 4:
        raise ValueError(f"time_cond_proj_dim must be >= 4, got {time_cond_proj_dim}")
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if set(missing) != {COND_PROJ_KEY} or unexpected:
        raise ValueError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    p = next(teacher_unet.parameters())
    student.to(p.device)
    if student.dtype != p.dtype:
        student.to(p.dtype)
    return student.train()


@torch.no_grad()
def sample_student(unet: torch.nn.Module, scheduler_config: dict, text_states: torch.Tensor, seeds: list[int],
                   shape: tuple[int, int, int], *, steps: int = 4, omega: float = 7.5,
                   original_inference_steps: int | None = None, timestep_scaling: float | None = None,
                   latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                   strength: float = 1.0) -> torch.Tensor:
    """Few-step latents of an LCM student (LCM Algorithm 3), one noise stream per image seed.

    Args:
        unet: the student (with ``time_cond_proj_dim``), or a teacher UNet carrying an LCM-LoRA (without).
        scheduler_config: its schedule (betas, prediction_type; an LCMScheduler config also gives
            ``original_inference_steps`` and ``timestep_scaling``).
        text_states: prompt encodings [B, L, D].
        seeds: one seed per image; seed b's stream gives the initial latents, then the step noises.
        shape: latent shape [C, h, w].
        steps: number of sampling steps, on the skipping grid of ``original_inference_steps`` points.
        omega: the paper's guidance w (= diffusers guidance_scale - 1).
        original_inference_steps: N of the skipping grid; default the config's, else 50.
        timestep_scaling: s of c_skip / c_out; default the config's, else ``parameterization.TIMESTEP_SCALING``.
        latents: initial latents [B, C, h, w] replacing each stream's first draw (the step noises stay per seed).
        image_latents: img2img: clean latents x0 [B, C, h, w] (VAE mode x scaling_factor), noised to the first
            timestep with each stream's first draw, as diffusers' LatentConsistencyModelImg2ImgPipeline does.
        strength: img2img strength in (0, 1]: the skipping grid is truncated to its first N * strength points.

    Returns:
        Denoised latents [B, C, h, w] (unscaled by the VAE factor).
    """
    n_grid = original_inference_steps or scheduler_config.get("original_inference_steps", 50)
    scaling = timestep_scaling if timestep_scaling is not None else scheduler_config.get(
        "timestep_scaling", P.TIMESTEP_SCALING)
    f = ConsistencyModel(Denoiser(unet, scheduler_config), timestep_scaling=scaling)
    p = next(unet.parameters())
    w = torch.full((len(seeds),), float(omega), device=p.device)
    d = unet.config.get("time_cond_proj_dim")
    # An LCM-LoRA'd teacher has no w input: its guidance is distilled in (paper-spec §11), omega is unused.
    w_emb = guidance_scale_embedding(w, d).to(p.dtype) if d is not None else None  # [B, d]
    noise_fn = per_image_noise(seeds, shape, dtype=p.dtype, device=p.device)
    if image_latents is None and strength != 1.0:
        raise ValueError("strength < 1 needs image_latents (img2img)")
    if image_latents is not None and latents is not None:
        raise ValueError("pass latents (text-to-image) or image_latents (img2img), not both")
    ts = lcm_timesteps(steps, len(f.denoiser.alpha_bar), n_grid, strength)
    x_T = noise_fn(-1) if latents is None else latents.to(p.device, p.dtype)  # [B, C, h, w]
    if image_latents is not None:  # img2img: z_{ts[0]} = alpha x0 + sigma noise (forward diffusion)
        x_T = renoise(image_latents.to(p.device, p.dtype), int(ts[0]), x_T, f.denoiser.alpha_bar)
    return sample_lcm(lambda x, t: f(x, t, text_states, w_emb), x_T, ts, noise_fn=noise_fn,
                      alpha_bar=f.denoiser.alpha_bar)
