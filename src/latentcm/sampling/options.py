"""One set of sampling options and every rule about which of them go together, checked in one place.

``SamplingOptions`` is frozen: the rules that need no model run when it is built (``__post_init__``), the
rules that do (which samplers a model takes, how many steps its grid allows) run in ``resolve``, which also
fills each unset option with the model's default. ``Bundle``, the HTTP service and the command line all
build one, so a bad combination gets the same ``ModelError`` everywhere; messages name parameters, never
command-line flags (the CLI maps them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..defaults import (CFG_LCM_GUIDANCE, LCM_DEFAULTS, LCM_SAMPLER, RENOISE, TEACHER_DEFAULTS, TEACHER_SAMPLERS,
                        TIMESTEP_SCHEDULES)
from ..errors import ModelError
from ..schedules import TRAIN_TIMESTEPS, img2img_points

SAMPLERS = (LCM_SAMPLER, *TEACHER_SAMPLERS)
LORA_GUIDANCE = "an LCM-LoRA has its guidance distilled in (no w embedding); leave out guidance"
NEGATIVE_LCM = ("a negative prompt replaces the unconditional branch of CFG, which this LCM does not run (its guidance "
                "is the w input, distilled from CFG with the empty prompt, and it was not distilled from w = 0); use "
                "a teacher sampler, a real-CFG LCM (guidance_mode 'cfg') or an LCM distilled from w = 0 (omega_min 0) "
                "for negative_prompt")

NEGATIVE_GUIDED = ("this guidance-distilled teacher takes w as an input, with the empty prompt's branch distilled in: "
                   "it cannot take a negative prompt; use its source teacher for negative_prompt")


@dataclass(frozen=True)
class ModelTraits:
    """What the sampling rules need to know about a model (``Bundle.traits``)."""

    is_lcm: bool
    original_inference_steps: int | None = None  # N of an LCM's skipping grid; None for a teacher
    num_train_timesteps: int = TRAIN_TIMESTEPS
    vae_factor: int = 8
    default_size: int = 64                       # the default image side (``Bundle.default_size``)
    timestep_schedule: str = "grid"              # the LCM sampler's schedule when none is given
    name: str = "this model"                     # how messages name the model (its folder)
    guidance_input: bool = False                 # the UNet takes w (time_cond_proj_dim): an LCM, a guided teacher
    guidance_mode: str = "embedding"             # an LCM's: "embedding" (w input) or "cfg" (real CFG, two passes)
    default_guidance: float | None = None        # the g its folder recommends (sampling.json); None: the kind's
    unguided_w0: bool = False                    # a w-input LCM distilled from w = 0: negatives by real CFG at w = 0
    renoise: str = "fresh"                       # the LCM sampler's re-noising when none is given (sampling.json)
    unguided_renoise: str | None = None          # the same at g = 1 without a negative prompt (sampling.json's unguided)

    @property
    def takes_negative(self) -> bool:
        """An LCM with a CFG branch to replace: a real-CFG LCM, or a w-input one whose w = 0 is unguided."""
        return self.guidance_mode == "cfg" or self.unguided_w0

    @property
    def defaults(self) -> tuple[str, int, float]:
        """(sampler, steps, guidance scale) used when the caller gives none."""
        sampler, steps, guidance = LCM_DEFAULTS if self.is_lcm else TEACHER_DEFAULTS
        if self.is_lcm and self.guidance_mode == "cfg":
            guidance = CFG_LCM_GUIDANCE
        return sampler, steps, guidance if self.default_guidance is None else float(self.default_guidance)

    @property
    def max_steps(self) -> int:
        """The most sampling steps: an LCM's grid size N, else T."""
        return self.original_inference_steps or self.num_train_timesteps


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: each None means the model's default (``resolve``).

    sampler: "lcm" for an LCM (or LCM-LoRA), else one of ``defaults.TEACHER_SAMPLERS`` (CFG).
    steps: sampling steps (LCM: 1..original_inference_steps, usually 1-8).
    guidance: guidance scale g (1 = none); an LCM is conditioned on the paper's w = g - 1.
    gamma: LCM only: TCD's stochasticity in [0, 1]; None samples with LCM Algorithm 3.
    guidance_max_t: teacher samplers only: guide the steps at t <= it (a guidance interval); None: every step.
    timesteps: LCM text-to-image only: an explicit descending schedule; ``steps`` is then its length.
    schedule: LCM text-to-image only: "grid" or "refine" (``defaults.TIMESTEP_SCHEDULES``).
    strength: img2img (LCM only): the fraction of the skipping grid kept, in (0, 1]; None: text-to-image.
    negative_prompt: teacher samplers only: the text of CFG's unconditional branch, eps_u in
        eps_u + g (eps_c - eps_u), instead of the empty prompt (as diffusers' ``negative_prompt``); None: "".
        An LCM distilled with guided consistency distillation has no unconditional branch to replace (its
        guidance is an input, w): it refuses one; a real-CFG LCM (guidance_mode "cfg") takes one, and so does a
        w-input LCM distilled from w = 0 (``unguided_w0``): real CFG between its w = 0 predictions for the
        prompt and the negative, at scale g (default ``CFG_LCM_GUIDANCE``).
    height, width: image size, multiples of the VAE factor (text-to-image; img2img takes the image's).
    renoise: LCM Algorithm 3 only (not with gamma): "fresh" re-noising noise, or "keep-means" (its channel means
        from the step's noise estimate, ``sampling.lcm.keep_channel_means``); None: the model's (sampling.json;
        at g = 1 without a negative prompt its ``unguided`` renoise, when it names one).
    """

    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    gamma: float | None = None
    guidance_max_t: int | None = None
    timesteps: tuple[int, ...] | None = None
    schedule: str | None = None
    strength: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    renoise: str | None = None
    # Room for guidance_mode (how the guided prediction is formed), with its rules below.

    def __post_init__(self):
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
        self._check_values()
        self._check_combinations()
        if self.strength is not None:
            object.__setattr__(self, "strength", float(self.strength))

    def _check_values(self) -> None:
        """Each option on its own."""
        if self.guidance is not None and not _finite(self.guidance):  # NaN passes every range check
            raise ModelError(f"guidance must be a finite number, got {self.guidance}")
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise ModelError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.strength is not None and not 0.0 < self.strength <= 1.0:
            raise ModelError(f"strength must be in (0, 1] (1 = start from pure noise), got {self.strength}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ModelError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.schedule is not None and self.schedule not in TIMESTEP_SCHEDULES:
            raise ModelError(f"unknown timestep schedule {self.schedule!r}; choose from {', '.join(TIMESTEP_SCHEDULES)}")
        if self.renoise is not None and self.renoise not in RENOISE:
            raise ModelError(f"unknown renoise {self.renoise!r}; choose from {', '.join(RENOISE)}")

    def _check_combinations(self) -> None:
        """Options that exclude each other, and options that only one kind of sampler takes."""
        if self.timesteps is not None and self.steps is not None and self.steps != len(self.timesteps):
            raise ModelError(f"steps={self.steps} but {len(self.timesteps)} timesteps given; pass one of them")
        if self.timesteps is not None and self.schedule is not None:
            raise ModelError("pass timesteps or schedule, not both")
        if self.strength is not None and (self.timesteps is not None or self.schedule is not None):
            raise ModelError("timesteps and schedule are for text-to-image; img2img picks its timesteps from strength")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ModelError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if self.gamma is not None and self.renoise not in (None, "fresh"):
            raise ModelError("renoise is LCM Algorithm 3's; TCD sampling (gamma) re-noises by its own rule")
        if self.sampler == LCM_SAMPLER and self.guidance_max_t is not None:
            raise ModelError("a guidance interval (guidance_max_t) is for teacher samplers; an LCM's was fixed "
                             "when it was distilled (its own guidance_max_t)")
        if self.sampler is None or self.sampler == LCM_SAMPLER:
            return
        if self.timesteps is not None:
            raise ModelError("explicit timesteps are for the LCM sampler; a teacher sampler takes steps")
        if self.schedule is not None:
            raise ModelError("a timestep schedule is for the LCM sampler; a teacher sampler takes steps")
        if self.gamma is not None:
            raise ModelError("gamma (TCD sampling) needs an LCM (sampler 'lcm'); teacher samplers do not support it")
        if self.renoise is not None:
            raise ModelError("renoise is the LCM sampler's; teacher samplers do not re-noise")
        if self.strength is not None:
            raise ModelError("img2img needs an LCM (sampler 'lcm': an LCM folder or an LCM-LoRA); teacher samplers "
                             "do not support it")

    @property
    def img2img(self) -> bool:
        return self.strength is not None

    def resolve(self, model: ModelTraits) -> "SamplingOptions":
        """These options for ``model``: each unset one replaced by its default, then checked against the model
        (ModelError when the model cannot sample them)."""
        d_sampler, d_steps, d_guidance = model.defaults
        sampler = d_sampler if self.sampler is None else self.sampler
        steps = self.steps if self.steps is not None else len(self.timesteps) if self.timesteps is not None else d_steps
        schedule = self.schedule
        if schedule is None and sampler == LCM_SAMPLER and self.timesteps is None and not self.img2img:
            schedule = model.timestep_schedule
        size = None if self.img2img else model.default_size
        if self.guidance is None and model.is_lcm and model.unguided_w0 and self.negative_prompt is not None:
            d_guidance = CFG_LCM_GUIDANCE  # real CFG at w = 0: a small CFG scale, not the w input's default
        guidance = d_guidance if self.guidance is None else self.guidance
        renoise = self.renoise
        if renoise is None and sampler == LCM_SAMPLER:
            unguided = guidance == 1 and self.negative_prompt is None and not self.img2img
            renoise = ("fresh" if self.gamma is not None else
                       model.unguided_renoise if unguided and model.unguided_renoise else model.renoise)
        out = dataclasses.replace(self, sampler=sampler, steps=steps, guidance=guidance, schedule=schedule,
                                  height=self.height or size, width=self.width or size, renoise=renoise)
        out._check_model(model)
        return out

    def _check_model(self, model: ModelTraits) -> None:
        if model.is_lcm and not model.takes_negative and self.negative_prompt is not None:
            raise ModelError(NEGATIVE_LCM)
        if model.guidance_input and not model.is_lcm and self.negative_prompt is not None:
            raise ModelError(NEGATIVE_GUIDED)
        if model.is_lcm and self.sampler != LCM_SAMPLER:
            raise ModelError(f"{model.name} is an LCM: sample it with sampler {LCM_SAMPLER!r} (teacher samplers "
                             f"would ignore its consistency training), not {self.sampler!r}")
        if not model.is_lcm and self.sampler == LCM_SAMPLER:
            raise ModelError(f"the {LCM_SAMPLER} sampler needs an LCM folder, but {model.name} is a diffusion "
                             f"teacher; use sampler {'|'.join(TEACHER_SAMPLERS)}")
        top = model.max_steps
        if not 1 <= self.steps <= top:
            raise ModelError(f"steps must be in 1..{top} for {model.name}" + (
                f" (its skipping grid has original_inference_steps={top}; 1-8 are the usual LCM range)"
                if model.is_lcm else "") + f", got {self.steps}")
        if self.img2img:
            points = img2img_points(top, self.strength)
            if self.steps > points:
                raise ModelError(f"strength {self.strength} keeps {points} points of the skipping grid: use at most "
                                 f"{points} steps or raise strength")
        if self.height is not None and self.width is not None:
            check_size(self.height, self.width, model.vae_factor)

    def check_lora(self) -> None:
        """ModelError when guidance is given for an LCM-LoRA, whose guidance is distilled in (no w input)."""
        if self.guidance is not None:
            raise ModelError(LORA_GUIDANCE)


def check_size(height: int, width: int, vae_factor: int) -> None:
    """ModelError unless height and width are multiples of the VAE factor."""
    if height % vae_factor or width % vae_factor:
        raise ModelError(f"height and width must be divisible by the VAE factor {vae_factor}, got {height}x{width}")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
