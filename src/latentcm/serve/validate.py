"""Every client input, bounded and parsed: a JSON object (or the UI's values) -> a ``Request``, or ``BadRequest``
with one line saying what is wrong. Clients name models and LoRAs, never files: nothing here reads a path."""
from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..defaults import (COMPARE_TEACHER_STEPS, IMG2IMG_STRENGTH, LCM_GUIDANCE, LCM_SAMPLER, LCM_STEPS,
                        TEACHER_GUIDANCE, TEACHER_STEPS)
from ..errors import ModelError
from ..sampling.options import ModelTraits, SamplingOptions
from ..schedules import GRID_POINTS

MODELS = ("lcm", "teacher")
SAMPLER = {"lcm": LCM_SAMPLER, "teacher": "ddim"}  # how each served model is sampled
FIELDS = ("prompt", "model", "steps", "guidance", "seed", "num_images", "height", "width", "gamma", "loras",
          "init_image", "strength", "negative_prompt", "renoise")


class BadRequest(ValueError):
    """A client error: ``status`` is its HTTP code (400, or 413 for an oversized body or upload)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """The bounds of every input the server accepts."""

    max_prompt_chars: int = 500
    max_lcm_steps: int = 8
    max_teacher_steps: int = TEACHER_STEPS
    guidance_range: tuple[float, float] = (0.0, 20.0)
    max_images: int = 4
    min_size: int = 32
    max_size: int = 128
    size_multiple: int = 16          # the VAE factor times the UNet's downsampling
    default_size: int = 64
    max_upload_bytes: int = 8 * 2**20
    max_upload_pixels: int = 4096 * 4096
    max_loras: int = 4
    lora_weight_range: tuple[float, float] = (0.0, 2.0)
    original_inference_steps: int = GRID_POINTS  # N of the LCM's skipping grid (img2img: schedules.img2img_points)
    lcm_guidance_mode: str = "embedding"  # the served LCM's (its sampling.json): "cfg" takes a negative prompt
    lcm_unguided_w0: bool = False         # the served LCM was distilled from w = 0: takes one too (CFG at w = 0)
    lcm_guidance: float = LCM_GUIDANCE    # the served LCM's default g (its sampling.json, else the kind's)

    @property
    def max_body_bytes(self) -> int:
        """The largest JSON body: a base64 upload (4/3 of the bytes) plus room for the other fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


@dataclass(frozen=True)
class Request:
    """One validated generation request: ``num_images`` images with seeds seed, seed + 1, ..."""

    prompt: str
    model: str = "lcm"
    steps: int = LCM_STEPS
    guidance: float | None = None            # None: the model's default (an LCM-LoRA has none)
    seed: int = 0
    num_images: int = 1
    height: int = 64
    width: int = 64
    gamma: float | None = None               # TCD stochasticity (LCM only); None: LCM Algorithm 3
    loras: tuple[tuple[str, float], ...] = ()  # registered LoRA names and weights, stacked on the teacher
    strength: float | None = None            # img2img only
    negative_prompt: str | None = None       # teacher or real-CFG LCM: CFG's unconditional text instead of ""
    renoise: str | None = None               # LCM: "fresh" | "keep-means"; None: the served LCM's own
    image: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [1, 3, H, W] in [-1, 1]

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    @property
    def options(self) -> SamplingOptions:
        """The request's sampling options (each model's default where the request has none)."""
        return SamplingOptions(SAMPLER[self.model], self.steps, self.guidance, self.gamma, strength=self.strength,
                               height=self.height, width=self.width, negative_prompt=self.negative_prompt,
                               renoise=self.renoise)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one UNet batch: same model, steps, guidance, gamma, size, LoRAs,
        img2img strength, negative prompt and re-noising."""
        return (self.model, self.loras, self.steps, self.guidance, self.gamma, self.height, self.width,
                self.image is not None, self.strength, self.negative_prompt, self.renoise)


def _number(payload: dict, name: str, lo: float, hi: float, default, *, integer: bool = False, nullable=False):
    value = payload.get(name, default)
    if value is None and (nullable or default is None):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {type(value).__name__}")
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"{name} must be an integer, got {value}")
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be in {lo}..{hi}, got {value}")
    return int(value) if integer else float(value)


def decode_upload(data, limits: Limits) -> Image.Image:
    """A base64 string (or data URL) -> a loaded PIL image, bounded in bytes and pixels; else BadRequest."""
    if not isinstance(data, str):
        raise BadRequest("init_image must be a base64-encoded image (PNG, JPEG, WebP) as a string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_upload_bytes * 4 // 3 + 4:
        raise BadRequest(f"init_image is larger than the {limits.max_upload_bytes // 2**20} MB upload limit", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("init_image is not valid base64") from None
    return open_image(raw, limits)


def open_image(raw: bytes, limits: Limits) -> Image.Image:
    """Image bytes -> a loaded PIL image, bounded in bytes and pixels (no decompression bombs); else BadRequest."""
    if len(raw) > limits.max_upload_bytes:
        raise BadRequest(f"init_image is larger than the {limits.max_upload_bytes // 2**20} MB upload limit", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > limits.max_upload_pixels:
                raise BadRequest(f"init_image has {image.width}x{image.height} pixels; at most "
                                 f"{limits.max_upload_pixels} are accepted", 413)
            image.load()
    except BadRequest:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        raise BadRequest("init_image is not a readable image (PNG, JPEG, WebP, ...)") from None
    return image


def image_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image -> [1, 3, height, width] in [-1, 1], fitted as ``images.load_image`` fits files."""
    from ..images import fit_cover, from_pixels

    return from_pixels(np.array(fit_cover(image, width, height)))[None].contiguous()  # [1, 3, H, W]


def parse_request(payload, limits: Limits, loras: dict | tuple = (), *, image: Image.Image | None = None) -> Request:
    """A client's JSON object -> a ``Request``; BadRequest (one line) for anything out of bounds.

    Args:
        payload: the decoded JSON object (``FIELDS``; unknown fields are refused, not ignored).
        limits: the bounds.
        loras: the registered LoRA names (clients pick among them; a path is never accepted).
        image: an already-decoded init image (the UI's upload); the API sends ``init_image`` as base64.
    """
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; accepted: {', '.join(FIELDS)}")
    prompt = _parse_prompt(payload.get("prompt"), limits)
    model = payload.get("model", "lcm")
    if model not in MODELS:
        raise BadRequest(f"model must be one of {', '.join(MODELS)}, got {str(model)[:40]!r}")
    lora_list = _parse_loras(payload.get("loras"), limits, loras)
    if lora_list and model != "lcm":
        raise BadRequest("LoRAs turn the teacher into an LCM (LCM-LoRA); use model 'lcm' with loras")
    top = limits.max_lcm_steps if model == "lcm" else limits.max_teacher_steps
    steps = _number(payload, "steps", 1, top, LCM_STEPS if model == "lcm" else COMPARE_TEACHER_STEPS, integer=True)
    default_g = (None if lora_list else limits.lcm_guidance if model == "lcm"  # an LCM-LoRA has none (check_lora)
                 else TEACHER_GUIDANCE)
    guidance = _number(payload, "guidance", *limits.guidance_range, default_g)
    seed = _number(payload, "seed", 0, 2**31 - 1 - limits.max_images, 0, integer=True)
    num_images = _number(payload, "num_images", 1, limits.max_images, 1, integer=True)
    height, width = (_size(payload, name, limits) for name in ("height", "width"))
    gamma = _number(payload, "gamma", -math.inf, math.inf, None, nullable=True)  # its range: SamplingOptions
    image = _parse_image(payload, limits, image)
    if image is None and payload.get("strength") is not None:
        raise BadRequest("strength needs init_image (img2img)")
    strength = None if image is None else _number(payload, "strength", -math.inf, math.inf, IMG2IMG_STRENGTH)
    request = Request(prompt=prompt, model=model, steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                      height=height, width=width, gamma=gamma, loras=lora_list, strength=strength,
                      negative_prompt=_parse_negative(payload.get("negative_prompt"), limits),
                      renoise=_parse_renoise(payload.get("renoise")),
                      image=None if image is None else image_tensor(image, width, height))
    check_options(request, limits)
    return request


def check_options(request: Request, limits: Limits) -> None:
    """BadRequest with ``SamplingOptions``' message when the request's sampling options do not go together."""
    try:
        if request.loras:
            request.options.check_lora()
        request.options.resolve(ModelTraits(
            request.model == "lcm", limits.original_inference_steps if request.model == "lcm" else None,
            vae_factor=limits.size_multiple, default_size=limits.default_size, name=f"model {request.model!r}",
            guidance_mode=limits.lcm_guidance_mode if request.model == "lcm" else "embedding",
            unguided_w0=limits.lcm_unguided_w0 and request.model == "lcm"))
    except ModelError as err:
        raise BadRequest(str(err)) from None


def _parse_prompt(prompt, limits: Limits) -> str:
    if prompt is not None and not isinstance(prompt, str):
        kind = {"list": "an array", "dict": "an object", "bool": "a boolean"}.get(type(prompt).__name__, "a number")
        raise BadRequest(f"prompt must be a string, got {kind}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt is empty; describe the image, e.g. \"a red circle on a blue background\"")
    if len(prompt) > limits.max_prompt_chars:
        raise BadRequest(f"prompt has {len(prompt)} characters; at most {limits.max_prompt_chars} are accepted")
    if any(ord(c) < 32 and c not in "\t\n" for c in prompt):
        raise BadRequest("prompt contains control characters")
    return prompt


def _parse_renoise(value) -> str | None:
    """An optional re-noising mode: a string (its values are checked by ``SamplingOptions``) or null."""
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"renoise must be a string, got {type(value).__name__}")
    return value


def _parse_negative(text, limits: Limits) -> str | None:
    """An optional negative prompt: a string (empty allowed: CFG's default) within the prompt limits."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadRequest(f"negative_prompt must be a string, got {type(text).__name__}")
    if len(text) > limits.max_prompt_chars:
        raise BadRequest(f"negative_prompt has {len(text)} characters; at most {limits.max_prompt_chars} are accepted")
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise BadRequest("negative_prompt contains control characters")
    return text


def _size(payload: dict, name: str, limits: Limits) -> int:
    value = _number(payload, name, limits.min_size, limits.max_size, limits.default_size, integer=True)
    if value % limits.size_multiple:
        raise BadRequest(f"{name} must be a multiple of {limits.size_multiple}, got {value}")
    return value


def _parse_image(payload: dict, limits: Limits, image: Image.Image | None) -> Image.Image | None:
    """The init image: the UI's upload, else the API's base64 ``init_image``, else None."""
    if image is None and payload.get("init_image") is not None:
        return decode_upload(payload["init_image"], limits)
    if image is not None and image.width * image.height > limits.max_upload_pixels:
        raise BadRequest(f"init_image has {image.width}x{image.height} pixels; at most {limits.max_upload_pixels} "
                         f"are accepted", 413)
    return image


def _parse_loras(value, limits: Limits, registered) -> tuple[tuple[str, float], ...]:
    """[{"name": NAME, "weight": W}, ...] (or ["NAME", ...]) -> ((name, weight), ...) of registered names."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list):
        raise BadRequest("loras must be a list of {\"name\": ..., \"weight\": ...} objects")
    if len(value) > limits.max_loras:
        raise BadRequest(f"at most {limits.max_loras} LoRAs can be stacked, got {len(value)}")
    names = sorted(registered)
    out = []
    for item in value:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or set(entry) - {"name", "weight"}:
            raise BadRequest("each LoRA must be {\"name\": NAME, \"weight\": W}")
        name = entry.get("name")
        if not isinstance(name, str) or name not in registered:
            shown = str(name)[:60]
            raise BadRequest(f"unknown LoRA {shown!r}: LoRAs are chosen by registered name, never by path; "
                             f"registered: {', '.join(names) or 'none'}")
        weight = _number(entry, "weight", *limits.lora_weight_range, 1.0)
        if any(name == n for n, _ in out):
            raise BadRequest(f"LoRA {name!r} is listed twice")
        out.append((name, weight))
    return tuple(out)
