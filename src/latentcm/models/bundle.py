"""Load a diffusers-format Stable Diffusion or LCM folder (local only) and sample from it.

A folder is an LCM when its scheduler is an ``LCMScheduler`` and its UNet takes the guidance embedding
(``time_cond_proj_dim``); it is sampled with ``sampler="lcm"`` (one UNet pass per step, no CFG). A
diffusion teacher is sampled with DDIM / DPM-Solver / DPM-Solver++ and classifier-free guidance.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import offline  # noqa: F401
from ..guidance import omega_from_guidance
from ..sampling import initial_latents, sample_teacher
from .components import encode_text
from .denoiser import sample_student
from . import sdxl

SAMPLERS = ("ddim", "dpm-solver", "dpm-solver++")   # teacher samplers (CFG, two UNet passes per step)
LCM_SAMPLER = "lcm"                                 # multistep consistency sampling (one UNet pass per step)
TEACHER_DEFAULTS = ("ddim", 50, 7.5)                # (sampler, steps, guidance scale g)
LCM_DEFAULTS = (LCM_SAMPLER, 4, 8.5)                # g = 8.5 is the paper's w = 7.5


class ModelError(ValueError):
    """A model folder is missing or malformed (reported as a one-line CLI error)."""


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler for teacher sampling, built from the teacher's config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    base = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config(base)
    if name in ("dpm-solver", "dpm-solver++"):
        algo = "dpmsolver" if name == "dpm-solver" else "dpmsolver++"
        # DPM-Solver (noise prediction) cannot step to sigma = 0; diffusers ends it at sigma_min.
        final = "zero" if algo == "dpmsolver++" else "sigma_min"
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type=algo, solver_order=2,
                                                       final_sigmas_type=final)
    raise ModelError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def check_model_dir(path: str | Path) -> Path:
    """The folder, if it holds a diffusers pipeline with every part sampling needs; else ModelError."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelError(f"{path} lacks the '{sub}' subfolder")
    return path


@dataclass
class Bundle:
    """The parts of a Stable-Diffusion-style model that sampling needs."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    path: Path | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (pooled embedding)
    tokenizer_2: object = None
    force_zeros_for_empty_prompt: bool = True       # SDXL: zero uncond embeddings (pipeline config)

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = check_model_dir(path)
        offline.quiet_loading()
        kw = dict(local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw).eval()
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw).eval()
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw).eval()
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", **kw)
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        check_kind(dict(unet.config), sched, path)
        if not sdxl.is_text_time(unet.config):
            return cls(unet, vae, text_encoder, tokenizer, sched, path)
        from transformers import CLIPTextModelWithProjection

        if not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir():
            raise ModelError(f"{path} has an SDXL UNet (text_time) but lacks text_encoder_2/ or tokenizer_2/")
        index = json.loads((path / "model_index.json").read_text())
        return cls(unet, vae, text_encoder, tokenizer, sched, path,
                   CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw).eval(),
                   CLIPTokenizer.from_pretrained(path / "tokenizer_2", **kw),
                   bool(index.get("force_zeros_for_empty_prompt", True)))

    def to(self, device: str | torch.device) -> "Bundle":
        """Move every network to ``device`` (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self

    @property
    def is_lcm(self) -> bool:
        """True for a Latent Consistency Model folder (LCMScheduler + guidance-embedding UNet)."""
        return self.scheduler_config.get("_class_name") == "LCMScheduler"

    @property
    def original_inference_steps(self) -> int | None:
        """N of an LCM's skipping grid (the most sampling steps it supports); None for a teacher."""
        return self.scheduler_config.get("original_inference_steps", 50) if self.is_lcm else None

    @property
    def defaults(self) -> tuple[str, int, float]:
        """(sampler, steps, guidance scale) used when the caller gives none."""
        return LCM_DEFAULTS if self.is_lcm else TEACHER_DEFAULTS

    def resolve(self, sampler: str | None, steps: int | None, guidance: float | None) -> tuple[str, int, float]:
        """The given (sampler, steps, guidance), each None replaced by this model's default."""
        d_sampler, d_steps, d_guidance = self.defaults
        return (d_sampler if sampler is None else sampler, d_steps if steps is None else steps,
                d_guidance if guidance is None else guidance)

    def unet_evals_per_image(self, sampler: str, steps: int) -> int:
        """UNet passes one image costs: LCM one per step, a CFG teacher two (cond + uncond)."""
        return steps if sampler == LCM_SAMPLER else 2 * steps

    def check_sampling(self, sampler: str, steps: int) -> None:
        """ModelError unless ``sampler`` suits this kind of model and ``steps`` fits it."""
        name = self.path or "this model"
        if self.is_lcm and sampler != LCM_SAMPLER:
            raise ModelError(f"{name} is an LCM: sample it with --sampler {LCM_SAMPLER} (teacher samplers "
                             f"would ignore its consistency training), not {sampler!r}")
        if not self.is_lcm and sampler == LCM_SAMPLER:
            raise ModelError(f"the {LCM_SAMPLER} sampler needs an LCM folder, but {name} is a diffusion teacher; "
                             f"use --sampler {'|'.join(SAMPLERS)}")
        if sampler not in (LCM_SAMPLER, *SAMPLERS):
            raise ModelError(f"unknown sampler {sampler!r}; choose from {', '.join((LCM_SAMPLER, *SAMPLERS))}")
        top = self.original_inference_steps or 1000
        if not 1 <= steps <= top:
            raise ModelError(f"steps must be in 1..{top} for {name}" + (
                f" (its skipping grid has original_inference_steps={top}; 1-8 are the usual LCM range)"
                if self.is_lcm else "") + f", got {steps}")

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        """True for an SDXL-family model (two text encoders; pooled text and time_ids as added conditions)."""
        return self.text_encoder_2 is not None

    def _time_ids(self, size: tuple[int, int] | None) -> torch.Tensor:
        """SDXL time_ids [1, 6] for an image size (default: the UNet's, as the diffusers pipeline)."""
        side = self.unet.config.sample_size * self.vae_factor
        return sdxl.time_ids(*(size or (side, side)))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Conditioning [B, L, D] (SDXL: packed [B, L + 1, D], see ``sdxl``; ``size`` = (h, w) for its time_ids)."""
        if self.is_sdxl:
            return sdxl.encode_prompts((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2),
                                       prompts, self._time_ids(size))
        return encode_text(self.text_encoder, self.tokenizer, prompts)

    @torch.no_grad()
    def encode_uncond(self, n: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The unconditional branch of CFG for n images: the empty prompt (SDXL: zeros when
        force_zeros_for_empty_prompt, as StableDiffusionXLPipeline)."""
        if self.is_sdxl:
            return sdxl.encode_uncond((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2),
                                      n, self._time_ids(size), self.force_zeros_for_empty_prompt)
        return self.encode_prompts([""] * n)

    def eps_fn(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The teacher's raw output (eps, v or x0, per scheduler_config) for a batch."""
        if self.is_sdxl:
            return sdxl.unet_forward(self.unet, z, t, text).sample
        return self.unet(z, t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_factor
        if height % f or width % f:
            raise ModelError(f"height and width must be divisible by the VAE factor {f}, got {height}x{width}")
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], sampler: str | None = None,
                       steps: int | None = None, guidance: float | None = None, height: int | None = None,
                       width: int | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] (unscaled by the VAE factor); arguments as in ``generate``."""
        sampler, steps, guidance = self.resolve(sampler, steps, guidance)
        self.check_sampling(sampler, steps)
        if len(prompts) != len(seeds):
            raise ModelError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        size = self.unet.config.sample_size * self.vae_factor
        shape = self.latent_shape(height or size, width or size)
        image_size = (shape[1] * self.vae_factor, shape[2] * self.vae_factor)  # SDXL time_ids
        cond = self.encode_prompts(prompts, image_size)  # [B, L, D]
        if sampler == LCM_SAMPLER:
            return sample_student(self.unet, self.scheduler_config, cond, seeds, shape, steps=steps,
                                  omega=omega_from_guidance(guidance), latents=latents)
        if latents is None:
            latents = initial_latents(seeds, shape, device=self.unet.device)
        uncond = self.encode_uncond(len(prompts), image_size)
        return sample_teacher(self.eps_fn, make_scheduler(sampler, self.scheduler_config), latents,
                              cond, uncond, guidance, steps)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
        """Sample images [B, 3, H, W] in [-1, 1], one per (prompt, seed).

        Args:
            prompts: one prompt per image.
            seeds: one seed per image; image b depends on seeds[b] only, never on the batch.
            sampler: "lcm" for an LCM folder; "ddim" | "dpm-solver" | "dpm-solver++" (CFG against the
                empty prompt) for a teacher. Default: ``self.defaults``.
            steps: sampling steps (LCM: 1..original_inference_steps, usually 1-8).
            guidance: guidance scale g (1 = none); an LCM is conditioned on the paper's w = g - 1.
            height, width: image size (default the model's).
            latents: initial latents [B, C, h, w] instead of the seeds' first draws.
        """
        return self.decode(self.sample_latents(prompts, seeds, sampler, steps, guidance, height, width, latents))


def check_kind(unet_config: dict, scheduler_config: dict, path: Path) -> None:
    """ModelError for folders that are half LCM: an LCMScheduler needs a guidance-embedding UNet and vice versa."""
    lcm_sched = scheduler_config.get("_class_name") == "LCMScheduler"
    w_unet = unet_config.get("time_cond_proj_dim") is not None
    if lcm_sched != w_unet:
        raise ModelError(f"{path}: an LCM folder needs both an LCMScheduler and a UNet with time_cond_proj_dim "
                         f"(found scheduler {scheduler_config.get('_class_name')}, time_cond_proj_dim "
                         f"{unet_config.get('time_cond_proj_dim')}); LCM-LoRA folders are not supported")
    if lcm_sched and (scheduler_config.get("thresholding") or scheduler_config.get("clip_sample")):
        raise ModelError(f"{path}: LCMScheduler with thresholding or clip_sample is not supported")
