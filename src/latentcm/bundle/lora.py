"""Stacking LoRA files (an LCM-LoRA, style LoRAs) onto a teacher's UNet, and the LCMScheduler config the stack
samples with."""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

from ..errors import ModelError, one_line
from ..schedules import GRID_POINTS, lcm_scheduler_config, skip_of, train_timesteps


def load_loras(bundle, loras: list[tuple[str, float]]) -> None:
    """Load LoRA files (diffusers or kohya keys; a folder or a .safetensors file) into ``bundle``'s UNet as
    adapters lora0, lora1, ..., active with their weights (through diffusers' pipeline LoRA loader)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=DDIMScheduler.from_config(bundle.scheduler_config),
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
            with _quiet():
                pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=f"lora{i}",
                                       use_safetensors=True, **kw)
        except Exception as exc:  # diffusers/peft raise many types on malformed files: one line for the user
            raise ModelError(f"cannot load LoRA {path}: {mismatch(exc) or one_line(exc)}") from exc
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])


@contextlib.contextmanager
def _quiet():
    """peft's warnings (one per adapter after the first, and per key of a mismatched file) and diffusers' logged
    copy of a load error are silenced: the error, if any, is reported once as a ModelError."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


_SIZE = re.compile(r"size mismatch for (\S+?)(?:\.lora\d+)?\.weight: copying a param with shape "
                   r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)")


def mismatch(exc: BaseException, shown: int = 3) -> str | None:
    """A load_state_dict error as one line: how many weights disagree and the first few (file vs model), or the
    first missing / unexpected keys; None for another error."""
    text = str(exc)
    sizes = _SIZE.findall(text)
    if sizes:
        first = "; ".join(f"{name}: file {a}, model {b}" for name, a, b in sizes[:shown])
        return f"made for another model: {len(sizes)} weights disagree in shape, e.g. {first}"
    keys = _KEYS.search(text)
    if keys:
        names = [k.strip(" .\"") for k in keys.group(2).split(",")]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return f"made for another model: {keys.group(1).lower()} keys {', '.join(names[:shown])}{more}"
    return None


def lora_scheduler_config(first: Path, teacher_config: dict) -> dict:
    """The LCMScheduler config of a LoRA stack: its first folder's, else the teacher's betas on an N-point grid."""
    sched_file = first / "scheduler_config.json"
    if first.is_dir() and sched_file.is_file():
        sched = json.loads(sched_file.read_text())
    else:
        skip = skip_of(train_timesteps(teacher_config), GRID_POINTS)
        sched = {"_class_name": "LCMScheduler", **lcm_scheduler_config(teacher_config, skip)}
    if sched.get("_class_name") != "LCMScheduler":
        raise ModelError(f"{sched_file} is not an LCMScheduler config")
    return sched
