"""Load a diffusers-format Stable Diffusion folder (local only) and sample from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import offline  # noqa: F401
from ..sampling import initial_latents, sample_teacher

SAMPLERS = ("ddim", "dpm-solver", "dpm-solver++")


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
        return cls(unet, vae, text_encoder, tokenizer, sched, path)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def eps_fn(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_factor
        if height % f or width % f:
            raise ModelError(f"height and width must be divisible by the VAE factor {f}, got {height}x{width}")
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: str = "ddim", steps: int = 50,
                 guidance: float = 7.5, height: int | None = None, width: int | None = None,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher sampling with CFG against the empty prompt; returns images [-1, 1]."""
        size = self.unet.config.sample_size * self.vae_factor
        shape = self.latent_shape(height or size, width or size)
        if latents is None:
            latents = initial_latents(seeds, shape)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts))
        z = sample_teacher(self.eps_fn, make_scheduler(sampler, self.scheduler_config), latents,
                           cond, uncond, guidance, steps)
        return self.decode(z)
