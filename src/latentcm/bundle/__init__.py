"""Load a diffusers-format Stable Diffusion or LCM folder (local only) and sample from it.

A folder is an LCM when its scheduler is an ``LCMScheduler`` and its UNet takes the guidance embedding
(``time_cond_proj_dim``); it is sampled with ``sampler="lcm"`` (one UNet pass per step, no CFG). A
diffusion teacher is sampled with DDIM / DPM-Solver / DPM-Solver++ and classifier-free guidance.

    loading.py  the folder's parts and checks (``check_model_dir``, ``check_kind``, ``sampling_schedule``)
    lora.py     LoRA stacking onto a teacher's UNet and the stack's LCMScheduler config
    prompts.py  the LRU of prompt encodings
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import offline  # noqa: F401
from ..defaults import IMG2IMG_STRENGTH, LCM_DEFAULTS, LCM_SAMPLER, TEACHER_DEFAULTS
from ..defaults import TEACHER_SAMPLERS as SAMPLERS
from ..errors import ModelError
from ..images import load_image
from ..models import sdxl
from ..models.components import encode_text
from ..sampling.latents import sample
from ..sampling.options import ModelTraits, SamplingOptions, check_size
from ..schedules import GRID_POINTS, train_timesteps
from .loading import (SAMPLING_FILE, check_kind, check_model_dir, load_first_step, load_parts, parse_sampling,
                      sampling_schedule, sampling_settings)
from .lora import load_loras, lora_scheduler_config
from .prompts import PromptCache

__all__ = ["Bundle", "ModelError", "SAMPLING_FILE", "check_kind", "check_model_dir", "parse_sampling", "sampling_schedule",
           "LCM_DEFAULTS", "TEACHER_DEFAULTS", "SAMPLERS"]


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
    loras: list[tuple[str, float]] = field(default_factory=list)  # LoRA files loaded into the UNet (``add_loras``)
    # How the LCM sampler picks timesteps when none are given: "grid" (diffusers' LCMScheduler) or "refine"
    # (schedules.refine_timesteps); an LCM folder's sampling.json sets it (SAMPLING_FILE).
    timestep_schedule: str = "grid"
    # How an LCM forms its guided prediction (SAMPLING_FILE): "embedding" (w input) or "cfg" (real CFG, two passes)
    guidance_mode: str = "embedding"
    default_guidance: float | None = None  # the g the folder's SAMPLING_FILE recommends; None: the kind's default
    # SAMPLING_FILE: a w-input LCM distilled from w = 0, which takes a negative prompt through real CFG at w = 0
    unguided_w0: bool = False
    renoise: str = "fresh"  # SAMPLING_FILE: the LCM sampler's re-noising noise (defaults.RENOISE)
    # SAMPLING_FILE's unguided entry (``loading.parse_unguided``): sampling where the w input is 0
    unguided: dict | None = None
    # Its first step: the UNet with the unguided first-step LoRA merged in (``loading.load_first_step``)
    first_step_unet: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    # Opt-in speed-ups (``optimize``); the defaults leave every output as it was.
    autocast_dtype: torch.dtype | None = None   # e.g. torch.bfloat16: UNet and VAE under torch.autocast
    channels_last_vae: bool = False             # VAE weights and inputs in channels_last memory format
    # LRU of prompt encodings, keyed by (encoder, size, prompt); size 0: off
    prompt_cache: PromptCache = field(default_factory=PromptCache, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, loras: list[tuple[str, float]] | None = None) -> "Bundle":
        """Load a local diffusers folder; ``loras`` [(file or folder, weight), ...] are stacked onto its UNet."""
        bundle = cls(*load_parts(path))
        if bundle.is_lcm:
            bundle.use_sampling(sampling_settings(Path(path)))
        return bundle.add_loras(loras) if loras else bundle

    def use_sampling(self, settings: dict) -> "Bundle":
        """Take an LCM's SAMPLING_FILE settings (``loading.sampling_settings``); returns self."""
        self.timestep_schedule, self.guidance_mode = settings["timestep_schedule"], settings["guidance_mode"]
        self.default_guidance, self.unguided_w0 = settings["guidance"], settings.get("unguided_w0", False)
        self.renoise = settings.get("renoise", "fresh")
        self.unguided = settings.get("unguided")
        self.first_step_unet = load_first_step(self.unet, self.path, self.unguided)
        return self

    def sampling_file(self) -> dict:
        """The SAMPLING_FILE settings this bundle samples with (what ``use_sampling`` takes)."""
        return {"timestep_schedule": self.timestep_schedule, "guidance_mode": self.guidance_mode,
                "guidance": self.default_guidance, "unguided_w0": self.unguided_w0, "renoise": self.renoise}

    def to(self, device: str | torch.device) -> "Bundle":
        """Move every network to ``device`` (in place); returns self."""
        for module in (self.unet, self.first_step_unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self

    def optimize(self, *, prompt_cache: int | None = None, dtype: torch.dtype | None = None,
                 channels_last_vae: bool | None = None, compile_unet: bool = False) -> "Bundle":
        """Opt-in speed-ups for a long-running sampler (in place; returns self): an LRU of ``prompt_cache``
        prompt encodings, ``dtype`` autocast (torch.bfloat16; torch.float32 turns it off), the VAE in
        channels_last, and ``torch.compile`` of the UNet, laid out channels_last (it compiles on the first use of
        each shape; fp32 output within ~1e-5 of eager, ``benchmarks/bench_sampling.py``)."""
        if prompt_cache is not None:
            self.prompt_cache.resize(prompt_cache)
        if dtype is not None:
            self.autocast_dtype = None if dtype == torch.float32 else dtype
        if channels_last_vae is not None:
            self.channels_last_vae = bool(channels_last_vae)
            self.vae.to(memory_format=torch.channels_last if channels_last_vae else torch.contiguous_format)
        if compile_unet:  # channels_last + inductor: measured faster than either alone on CPU
            self.unet.to(memory_format=torch.channels_last)
            self.unet.compile()
        return self

    @property
    def prompt_cache_stats(self) -> dict:
        """{"hits": ..., "misses": ...} of the prompt cache."""
        return self.prompt_cache.stats

    def _autocast(self):
        """torch.autocast(dtype) when ``autocast_dtype`` is set, else a no-op context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.unet.device.type, dtype=self.autocast_dtype)

    # --- what kind of model ---------------------------------------------------------------------------

    @property
    def is_lcm(self) -> bool:
        """True for a Latent Consistency Model folder (LCMScheduler + guidance-embedding UNet)."""
        return self.scheduler_config.get("_class_name") == "LCMScheduler"

    @property
    def original_inference_steps(self) -> int | None:
        """N of an LCM's skipping grid (the most sampling steps it supports); None for a teacher."""
        return self.scheduler_config.get("original_inference_steps", GRID_POINTS) if self.is_lcm else None

    @property
    def defaults(self) -> tuple[str, int, float]:
        """(sampler, steps, guidance scale) used when the caller gives none (``ModelTraits.defaults``)."""
        return self.traits.defaults

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The default image side: the UNet's sample size times the VAE factor."""
        return self.unet.config.sample_size * self.vae_factor

    @property
    def is_sdxl(self) -> bool:
        """True for an SDXL-family model (two text encoders; pooled text and time_ids as added conditions)."""
        return self.text_encoder_2 is not None

    @property
    def traits(self) -> ModelTraits:
        """What ``SamplingOptions.resolve`` needs to know about this model."""
        return ModelTraits(self.is_lcm, self.original_inference_steps, train_timesteps(self.scheduler_config),
                           self.vae_factor, self.default_size, self.timestep_schedule, str(self.path or "this model"),
                           self.unet.config.get("time_cond_proj_dim") is not None, self.guidance_mode,
                           self.default_guidance, self.unguided_w0, self.renoise,
                           (self.unguided or {}).get("renoise"))

    def sampling_options(self, options: SamplingOptions | None = None, **given) -> SamplingOptions:
        """``options`` (or ones built from the keywords ``given``) resolved for this model; ModelError when
        the model cannot sample them."""
        if options is None:
            options = SamplingOptions(**given)
        elif any(v is not None for v in given.values()):
            raise TypeError("pass SamplingOptions or sampling keywords, not both")
        return options.resolve(self.traits)

    def unet_evals_per_image(self, sampler: str, steps: int) -> int:
        """UNet passes one image costs: an LCM with a w input one per step; a CFG teacher and a real-CFG LCM two
        (cond + uncond); a guidance-distilled teacher one."""
        if sampler == LCM_SAMPLER:
            return 2 * steps if self.guidance_mode == "cfg" else steps
        return steps if self.unet.config.get("time_cond_proj_dim") is not None else 2 * steps

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_factor
        check_size(height, width, f)
        return (self.unet.config.in_channels, height // f, width // f)

    # --- prompts, VAE ---------------------------------------------------------------------------------

    def _time_ids(self, size: tuple[int, int] | None) -> torch.Tensor:
        """SDXL time_ids [1, 6] for an image size (default: the UNet's, as the diffusers pipeline)."""
        return sdxl.time_ids(*(size or (self.default_size, self.default_size)))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Conditioning [B, L, D] (SDXL: packed [B, L + 1, D], see ``sdxl``; ``size`` = (h, w) for its time_ids)."""
        if self.prompt_cache.size <= 0:
            return self._encode_prompts(prompts, size)
        encoders = (id(self.text_encoder), id(self.text_encoder_2))
        keys = [(encoders, tuple(size) if self.is_sdxl and size else None, p) for p in prompts]
        return self.prompt_cache.encodings(keys, lambda missing: self._encode_prompts([k[2] for k in missing], size))

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.is_sdxl:
            return sdxl.encode_prompts((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2),
                                       prompts, self._time_ids(size))
        return encode_text(self.text_encoder, self.tokenizer, prompts)

    @torch.no_grad()
    def _cfg_uncond(self, o: SamplingOptions, n: int, size) -> torch.Tensor | None:
        """CFG's unconditional branch (the negative prompt or ""): teacher samplers and a real-CFG LCM take one; a
        w-input LCM distilled from w = 0 (``unguided_w0``) takes a negative prompt only (real CFG at w = 0); the
        options' check has refused a negative for any other w-input LCM."""
        if o.sampler == LCM_SAMPLER and self.guidance_mode != "cfg" and o.negative_prompt is None:
            return None
        return self.encode_uncond(n, size, o.negative_prompt)

    def encode_uncond(self, n: int, size: tuple[int, int] | None = None,
                      negative_prompt: str | None = None) -> torch.Tensor:
        """The unconditional branch of CFG for n images: the empty prompt (SDXL: zeros when
        force_zeros_for_empty_prompt, as StableDiffusionXLPipeline), or ``negative_prompt`` encoded as a prompt
        is (as diffusers' pipelines encode ``negative_prompt``)."""
        if negative_prompt is not None:
            return self.encode_prompts([negative_prompt] * n, size)
        if self.is_sdxl:
            return sdxl.encode_uncond((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2),
                                      n, self._time_ids(size), self.force_zeros_for_empty_prompt)
        return self.encode_prompts([""] * n)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        if self.autocast_dtype is None and not self.channels_last_vae:
            return self.vae.decode(z).sample.clamp(-1, 1)
        if self.channels_last_vae:
            z = z.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.vae.decode(z).sample.float().clamp(-1, 1).contiguous()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w]: VAE posterior mode x scaling_factor."""
        x = images.to(self.vae.device, self.vae.dtype)
        if self.autocast_dtype is None and not self.channels_last_vae:
            return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor  # [B, C, h, w]
        if self.channels_last_vae:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            z = self.vae.encode(x).latent_dist.mode()  # [B, C, h, w]
        return z.float().contiguous() * self.vae.config.scaling_factor

    # --- sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], sampler: str | None = None,
                       steps: int | None = None, guidance: float | None = None, height: int | None = None,
                       width: int | None = None, latents: torch.Tensor | None = None,
                       gamma: float | None = None, guidance_max_t: int | None = None,
                       timesteps: list[int] | None = None, schedule: str | None = None, *,
                       negative_prompt: str | None = None, renoise: str | None = None,
                       options: SamplingOptions | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] (unscaled by the VAE factor); arguments as in ``generate``."""
        o = self.sampling_options(options, sampler=sampler, steps=steps, guidance=guidance, gamma=gamma,
                                  guidance_max_t=guidance_max_t, timesteps=timesteps, schedule=schedule,
                                  height=height, width=width, negative_prompt=negative_prompt, renoise=renoise)
        if len(prompts) != len(seeds):
            raise ModelError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        shape = self.latent_shape(o.height, o.width)
        image_size = (o.height, o.width)  # SDXL time_ids
        cond = self.encode_prompts(prompts, image_size)  # [B, L, D]
        uncond = self._cfg_uncond(o, len(prompts), image_size)
        with self._autocast():
            out = sample(self.unet, self.scheduler_config, o, cond, seeds, shape, uncond=uncond, latents=latents,
                         first_step_unet=self.first_step_unet)
        return out if self.autocast_dtype is None else out.float()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 latents: torch.Tensor | None = None, gamma: float | None = None,
                 guidance_max_t: int | None = None, timesteps: list[int] | None = None,
                 schedule: str | None = None, *, negative_prompt: str | None = None, renoise: str | None = None,
                 options: SamplingOptions | None = None) -> torch.Tensor:
        """Sample images [B, 3, H, W] in [-1, 1], one per (prompt, seed).

        Args:
            prompts: one prompt per image.
            seeds: one seed per image; image b depends on seeds[b] only, never on the batch.
            sampler, steps, guidance, height, width, gamma, guidance_max_t, timesteps, schedule, renoise: the
                sampling options (``sampling.options.SamplingOptions``, where each is described); None: the
                model's default (``self.defaults``, ``self.default_size``, ``self.timestep_schedule``,
                ``self.renoise``).
            negative_prompt: teacher samplers: the text of CFG's unconditional branch instead of "" (an LCM
                refuses one: ``SamplingOptions``).
            latents: initial latents [B, C, h, w] instead of the seeds' first draws.
            options: the sampling options as one ``SamplingOptions`` instead of the keywords.
        """
        return self.decode(self.sample_latents(prompts, seeds, sampler, steps, guidance, height, width, latents,
                                               gamma, guidance_max_t, timesteps, schedule,
                                               negative_prompt=negative_prompt, renoise=renoise, options=options))

    @torch.no_grad()
    def img2img_latents(self, prompts: list[str], seeds: list[int], images: torch.Tensor,
                        strength: float = IMG2IMG_STRENGTH, sampler: str | None = None, steps: int | None = None,
                        guidance: float | None = None, gamma: float | None = None, *,
                        options: SamplingOptions | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] of LCM img2img, as diffusers' ``LatentConsistencyModelImg2ImgPipeline``:
        the VAE latent of ``images`` ([1 or B, 3, H, W] in [-1, 1]; they set the size) is noised to the first
        timestep of the skipping grid truncated to N * strength points with draw 0 of each seed's stream,
        then sampled as usual with draws 1, 2, ... as step noises. ``options`` (with ``strength``) may replace
        the keywords."""
        given = dict(sampler=sampler, steps=steps, guidance=guidance, gamma=gamma)
        o = (self.sampling_options(options, **given) if options is not None
             else self.sampling_options(strength=strength, **given))
        if not o.img2img:
            raise ModelError("img2img needs a strength")
        if len(prompts) != len(seeds) or images.shape[0] not in (1, len(seeds)):
            raise ModelError(f"need one seed per prompt and 1 or {len(seeds)} images, got {len(prompts)} prompts, "
                             f"{len(seeds)} seeds, {images.shape[0]} images")
        x0 = self.encode_images(images).expand(len(seeds), -1, -1, -1)  # [B, C, h, w]
        cond = self.encode_prompts(prompts, (images.shape[2], images.shape[3]))  # [B, L, D]; SDXL: the image's size
        with self._autocast():
            out = sample(self.unet, self.scheduler_config, o, cond, seeds, tuple(x0.shape[1:]), image_latents=x0,
                         uncond=self._cfg_uncond(o, len(prompts), (images.shape[2], images.shape[3])))
        return out if self.autocast_dtype is None else out.float()

    def img2img(self, prompts: list[str], seeds: list[int], image_path: str | Path,
                strength: float = IMG2IMG_STRENGTH, sampler: str | None = None, steps: int | None = None,
                guidance: float | None = None, height: int | None = None, width: int | None = None,
                gamma: float | None = None, *, options: SamplingOptions | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] from an init image file (fitted to height x width, default the model's)."""
        given = dict(sampler=sampler, steps=steps, guidance=guidance, gamma=gamma, height=height, width=width)
        o = (self.sampling_options(options, **given) if options is not None
             else self.sampling_options(strength=strength, **given))
        height, width = o.height or self.default_size, o.width or self.default_size
        check_size(height, width, self.vae_factor)
        images = load_image(image_path, width, height)
        return self.decode(self.img2img_latents(prompts, seeds, images, options=o))

    # --- LoRA -----------------------------------------------------------------------------------------

    def add_loras(self, loras: list[tuple[str, float]]) -> "Bundle":
        """Load LoRA files (diffusers or kohya keys; a folder or a .safetensors file) into this teacher's UNet,
        stacked with their weights, and make it an LCM for ``sampler="lcm"`` (in place; returns self).

        The LCMScheduler config is the first LoRA folder's ``scheduler_config.json`` when it has one (the
        training grid), else the teacher's betas with ``original_inference_steps`` N = GRID_POINTS. A UNet
        without a w embedding samples with ``timestep_cond=None``: an LCM-LoRA's guidance is distilled in.
        """
        if self.is_lcm:
            raise ModelError(f"{self.path} is already an LCM; load an LCM-LoRA onto a diffusion teacher folder")
        load_loras(self, loras)
        self.scheduler_config = lora_scheduler_config(Path(loras[0][0]), self.scheduler_config)
        self.loras = [*self.loras, *((str(Path(p).resolve()), float(w)) for p, w in loras)]  # names sample caches
        return self
