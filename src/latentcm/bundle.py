"""Load a diffusers-format Stable Diffusion or LCM folder (local only) and sample from it.

A folder is an LCM when its scheduler is an ``LCMScheduler`` and its UNet takes the guidance embedding
(``time_cond_proj_dim``); it is sampled with ``sampler="lcm"`` (one UNet pass per step, no CFG). A
diffusion teacher is sampled with DDIM / DPM-Solver / DPM-Solver++ and classifier-free guidance.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import offline  # noqa: F401
from .defaults import IMG2IMG_STRENGTH, LCM_DEFAULTS, LCM_SAMPLER, TEACHER_DEFAULTS
from .defaults import TEACHER_SAMPLERS as SAMPLERS
from .errors import ModelError
from .images import load_image
from .models import sdxl
from .registry import safetensors_files
from .models.components import encode_text
from .sampling.latents import sample_latents
from .schedules import GRID_POINTS, lcm_scheduler_config, skip_of

__all__ = ["Bundle", "ModelError", "check_kind", "check_model_dir", "LCM_DEFAULTS", "TEACHER_DEFAULTS", "SAMPLERS"]


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
    loras: list[tuple[str, float]] = field(default_factory=list)  # LoRA files loaded into the UNet (``add_loras``)
    # How the LCM sampler picks timesteps when none are given: "grid" (diffusers' LCMScheduler) or "refine"
    # (schedules.refine_timesteps); an LCM folder's sampling.json sets it (SAMPLING_FILE).
    timestep_schedule: str = "grid"
    # Opt-in speed-ups (``optimize``); the defaults leave every output as it was.
    prompt_cache_size: int = 0                  # LRU of prompt encodings, keyed by (encoder, size, prompt); 0: off
    autocast_dtype: torch.dtype | None = None   # e.g. torch.bfloat16: UNet and VAE under torch.autocast
    channels_last_vae: bool = False             # VAE weights and inputs in channels_last memory format
    _prompt_cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    prompt_cache_stats: dict = field(default_factory=lambda: {"hits": 0, "misses": 0}, init=False, repr=False,
                                     compare=False)

    @classmethod
    def load(cls, path: str | Path, loras: list[tuple[str, float]] | None = None) -> "Bundle":
        """Load a local diffusers folder; ``loras`` [(file or folder, weight), ...] are stacked onto its UNet."""
        bundle = cls._load(path)
        bundle.timestep_schedule = sampling_schedule(Path(path)) if bundle.is_lcm else "grid"
        return bundle.add_loras(loras) if loras else bundle

    @classmethod
    def _load(cls, path: str | Path) -> "Bundle":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = check_model_dir(path)
        offline.quiet_loading()
        kw = dict(local_files_only=True)

        def part(sub: str, load, weights: bool = True):
            """Load one subfolder; weights from safetensors only (never a pickle), any failure one ModelError."""
            folder = path / sub
            if weights:
                safetensors_files(folder)
            try:
                return load(folder, **kw, **({"use_safetensors": True} if weights else {}))
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 -- corrupt configs and weights raise many kinds of error
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"cannot load {folder}: {reason}") from exc

        def config(file: Path) -> dict:
            try:
                found = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot read {file}: {exc}") from None
            if not isinstance(found, dict):
                raise ModelError(f"{file} is not a JSON object")
            return found

        unet = part("unet", UNet2DConditionModel.from_pretrained).eval()
        vae = part("vae", AutoencoderKL.from_pretrained).eval()
        text_encoder = part("text_encoder", CLIPTextModel.from_pretrained).eval()
        tokenizer = part("tokenizer", CLIPTokenizer.from_pretrained, weights=False)
        sched = config(path / "scheduler" / "scheduler_config.json")
        check_kind(dict(unet.config), sched, path)
        if not sdxl.is_text_time(unet.config):
            return cls(unet, vae, text_encoder, tokenizer, sched, path)
        from transformers import CLIPTextModelWithProjection

        if not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir():
            raise ModelError(f"{path} has an SDXL UNet (text_time) but lacks text_encoder_2/ or tokenizer_2/")
        index = config(path / "model_index.json")
        return cls(unet, vae, text_encoder, tokenizer, sched, path,
                   part("text_encoder_2", CLIPTextModelWithProjection.from_pretrained).eval(),
                   part("tokenizer_2", CLIPTokenizer.from_pretrained, weights=False),
                   bool(index.get("force_zeros_for_empty_prompt", True)))

    def to(self, device: str | torch.device) -> "Bundle":
        """Move every network to ``device`` (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
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
            self.prompt_cache_size = int(prompt_cache)
            while len(self._prompt_cache) > self.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        if dtype is not None:
            self.autocast_dtype = None if dtype == torch.float32 else dtype
        if channels_last_vae is not None:
            self.channels_last_vae = bool(channels_last_vae)
            self.vae.to(memory_format=torch.channels_last if channels_last_vae else torch.contiguous_format)
        if compile_unet:  # channels_last + inductor: measured faster than either alone on CPU
            self.unet.to(memory_format=torch.channels_last)
            self.unet.compile()
        return self

    def _autocast(self):
        """torch.autocast(dtype) when ``autocast_dtype`` is set, else a no-op context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.unet.device.type, dtype=self.autocast_dtype)

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
        """(sampler, steps, guidance scale) used when the caller gives none."""
        return LCM_DEFAULTS if self.is_lcm else TEACHER_DEFAULTS

    def resolve(self, sampler: str | None, steps: int | None, guidance: float | None) -> tuple[str, int, float]:
        """The given (sampler, steps, guidance), each None replaced by this model's default."""
        d_sampler, d_steps, d_guidance = self.defaults
        guidance = d_guidance if guidance is None else guidance
        try:
            finite = math.isfinite(float(guidance))
        except (TypeError, ValueError):
            finite = False
        if not finite:  # NaN passes every range check and samples black images
            raise ModelError(f"guidance must be a finite number, got {guidance}")
        return (d_sampler if sampler is None else sampler, d_steps if steps is None else steps, guidance)

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
        if self.prompt_cache_size > 0:
            return self._cached_encodings(prompts, size)
        return self._encode_prompts(prompts, size)

    def _cached_encodings(self, prompts: list[str], size: tuple[int, int] | None) -> torch.Tensor:
        """``encode_prompts`` through the LRU: the prompts not cached are encoded as one batch, then kept."""
        encoders = (id(self.text_encoder), id(self.text_encoder_2))
        keys = [(encoders, tuple(size) if self.is_sdxl and size else None, p) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._prompt_cache))
        self.prompt_cache_stats["misses"] += len(missing)
        self.prompt_cache_stats["hits"] += len(keys) - len(missing)
        fresh = dict(zip(missing, self._encode_prompts([k[2] for k in missing], size))) if missing else {}
        rows = []
        for k in keys:
            row = fresh[k] if k in fresh else self._prompt_cache[k]
            self._prompt_cache[k] = row
            self._prompt_cache.move_to_end(k)
            rows.append(row)
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return torch.stack(rows)  # [B, L, D]

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str], size: tuple[int, int] | None = None) -> torch.Tensor:
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

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_factor
        if height % f or width % f:
            raise ModelError(f"height and width must be divisible by the VAE factor {f}, got {height}x{width}")
        return (self.unet.config.in_channels, height // f, width // f)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], sampler: str | None = None,
                       steps: int | None = None, guidance: float | None = None, height: int | None = None,
                       width: int | None = None, latents: torch.Tensor | None = None,
                       gamma: float | None = None, guidance_max_t: int | None = None,
                       timesteps: list[int] | None = None, schedule: str | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] (unscaled by the VAE factor); arguments as in ``generate``."""
        if timesteps is not None:
            if steps is not None and steps != len(timesteps):
                raise ModelError(f"steps={steps} but {len(timesteps)} timesteps given; pass one of them")
            steps = len(timesteps)
        sampler, steps, guidance = self.resolve(sampler, steps, guidance)
        self.check_sampling(sampler, steps)
        if schedule is not None and sampler != LCM_SAMPLER:
            raise ModelError("a timestep schedule is for the LCM sampler; a teacher sampler takes --steps")
        if len(prompts) != len(seeds):
            raise ModelError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        size = self.unet.config.sample_size * self.vae_factor
        shape = self.latent_shape(height or size, width or size)
        image_size = (shape[1] * self.vae_factor, shape[2] * self.vae_factor)  # SDXL time_ids
        cond = self.encode_prompts(prompts, image_size)  # [B, L, D]
        uncond = None if sampler == LCM_SAMPLER else self.encode_uncond(len(prompts), image_size)
        with self._autocast():
            out = sample_latents(self.unet, self.scheduler_config, sampler, cond, seeds, shape, steps=steps,
                                 guidance=guidance, uncond=uncond, latents=latents, gamma=gamma,
                                 guidance_max_t=guidance_max_t, timesteps=timesteps,
                                 schedule=schedule or self.timestep_schedule)
        return out if self.autocast_dtype is None else out.float()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 latents: torch.Tensor | None = None, gamma: float | None = None,
                 guidance_max_t: int | None = None, timesteps: list[int] | None = None,
                 schedule: str | None = None) -> torch.Tensor:
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
            gamma: LCM only: None (default) samples with LCM Algorithm 3; a value in [0, 1] samples with TCD's
                stochasticity gamma (Zheng et al. 2024; diffusers' TCDScheduler), 0 being deterministic.
            guidance_max_t: teacher samplers only: classifier-free guidance at the steps with t <= it, none above
                (a guidance interval, Kynkaanniemi et al. 2024); None (default) guides every step.
            timesteps: LCM only: an explicit descending schedule, e.g. [999, 499, 299, 99] (diffusers' LCM
                pipelines take the same ``timesteps``); ``steps`` is then its length.
            schedule: LCM only: how ``steps`` timesteps are picked, "grid" (diffusers' LCMScheduler) or "refine"
                (``schedules.refine_timesteps``); None: the model's own (``timestep_schedule``).
        """
        return self.decode(self.sample_latents(prompts, seeds, sampler, steps, guidance, height, width, latents,
                                               gamma, guidance_max_t, timesteps, schedule))


    # --- img2img (LCM only) -------------------------------------------------------------------------

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

    @torch.no_grad()
    def img2img_latents(self, prompts: list[str], seeds: list[int], images: torch.Tensor,
                        strength: float = IMG2IMG_STRENGTH, sampler: str | None = None, steps: int | None = None,
                        guidance: float | None = None, gamma: float | None = None) -> torch.Tensor:
        """Final latents [B, C, h, w] of LCM img2img, as diffusers' ``LatentConsistencyModelImg2ImgPipeline``:
        the VAE latent of ``images`` ([1 or B, 3, H, W] in [-1, 1]; they set the size) is noised to the first
        timestep of the skipping grid truncated to N * strength points with draw 0 of each seed's stream,
        then sampled as usual with draws 1, 2, ... as step noises."""
        if not self.is_lcm:
            raise ModelError("--init-image (img2img) needs an LCM folder or --lora; teacher samplers do not support it")
        sampler, steps, guidance = self.resolve(sampler, steps, guidance)
        self.check_sampling(sampler, steps)
        strength = check_strength(strength)
        if len(prompts) != len(seeds) or images.shape[0] not in (1, len(seeds)):
            raise ModelError(f"need one seed per prompt and 1 or {len(seeds)} images, got {len(prompts)} prompts, "
                             f"{len(seeds)} seeds, {images.shape[0]} images")
        x0 = self.encode_images(images).expand(len(seeds), -1, -1, -1)  # [B, C, h, w]
        size = (images.shape[2], images.shape[3])  # SDXL time_ids of the image's size
        cond = self.encode_prompts(prompts, size)  # [B, L, D]
        with self._autocast():
            out = sample_latents(self.unet, self.scheduler_config, sampler, cond, seeds, tuple(x0.shape[1:]),
                                 steps=steps, guidance=guidance, image_latents=x0, strength=strength, gamma=gamma)
        return out if self.autocast_dtype is None else out.float()

    def img2img(self, prompts: list[str], seeds: list[int], image_path: str | Path,
                strength: float = IMG2IMG_STRENGTH, sampler: str | None = None, steps: int | None = None,
                guidance: float | None = None, height: int | None = None, width: int | None = None,
                gamma: float | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] from an init image file (fitted to height x width, default the model's)."""
        size = self.unet.config.sample_size * self.vae_factor
        height, width = height or size, width or size
        self.latent_shape(height, width)  # ModelError unless divisible by the VAE factor
        images = load_image(image_path, width, height)
        return self.decode(self.img2img_latents(prompts, seeds, images, strength, sampler, steps, guidance, gamma))

    # --- LoRA -------------------------------------------------------------------------------------

    def add_loras(self, loras: list[tuple[str, float]]) -> "Bundle":
        """Load LoRA files (diffusers or kohya keys; a folder or a .safetensors file) into this teacher's UNet,
        stacked with their weights, and make it an LCM for ``sampler="lcm"`` (in place; returns self).

        The LCMScheduler config is the first LoRA folder's ``scheduler_config.json`` when it has one (the
        training grid), else the teacher's betas with ``original_inference_steps`` 50. A UNet without a w
        embedding samples with ``timestep_cond=None``: an LCM-LoRA's guidance is distilled in.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if self.is_lcm:
            raise ModelError(f"{self.path} is already an LCM; load an LCM-LoRA onto a diffusion teacher folder")
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=DDIMScheduler.from_config(self.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        names = []
        for i, (path, _) in enumerate(loras):
            path = Path(path)
            if not path.exists():
                raise ModelError(f"LoRA {path} does not exist")
            if path.is_file() and path.suffix != ".safetensors":
                raise ModelError(f"{path} is not a .safetensors file; latentcm loads LoRA weights from safetensors only")
            kw = {"weight_name": path.name} if path.is_file() else {}
            try:
                with warnings.catch_warnings():  # peft warns on every adapter after the first: stacking is intended
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=f"lora{i}",
                                           use_safetensors=True, **kw)
            except Exception as exc:  # diffusers/peft raise many types on malformed files: one line for the user
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"cannot load LoRA {path}: {reason}") from exc
            names.append(f"lora{i}")
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
        self.scheduler_config = _lora_scheduler_config(Path(loras[0][0]), self.scheduler_config)
        self.loras = [*self.loras, *((str(Path(p).resolve()), float(w)) for p, w in loras)]  # names sample caches
        return self


def _lora_scheduler_config(first: Path, teacher_config: dict) -> dict:
    """The LCMScheduler config of a LoRA stack: its first folder's, else the teacher's betas on a 50-point grid."""
    sched_file = first / "scheduler_config.json"
    if first.is_dir() and sched_file.is_file():
        sched = json.loads(sched_file.read_text())
    else:
        num_train = teacher_config.get("num_train_timesteps", 1000)
        sched = {"_class_name": "LCMScheduler", **lcm_scheduler_config(teacher_config, skip_of(num_train, GRID_POINTS))}
    if sched.get("_class_name") != "LCMScheduler":
        raise ModelError(f"{sched_file} is not an LCMScheduler config")
    return sched


SAMPLING_FILE = "sampling.json"  # an LCM folder's sampling defaults for latentcm; diffusers ignores the file


def sampling_schedule(path: Path) -> str:
    """The timestep schedule an LCM folder asks for in SAMPLING_FILE ({"timestep_schedule": "grid"|"refine"});
    "grid" (diffusers' selection) when the file is absent. ModelError on a file that is not such an object."""
    from .defaults import TIMESTEP_SCHEDULES

    file = Path(path) / SAMPLING_FILE
    if not file.is_file():
        return "grid"
    try:
        found = json.loads(file.read_text()).get("timestep_schedule", "grid")
    except (ValueError, AttributeError):
        raise ModelError(f"{file} is not a JSON object with a timestep_schedule") from None
    if found not in TIMESTEP_SCHEDULES:
        raise ModelError(f"{file}: timestep_schedule must be one of {', '.join(TIMESTEP_SCHEDULES)}, got {found!r}")
    return found


def check_strength(strength: float) -> float:
    """``strength`` as a float, or ModelError unless it lies in (0, 1]."""
    if not 0.0 < strength <= 1.0:
        raise ModelError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength}")
    return float(strength)


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
