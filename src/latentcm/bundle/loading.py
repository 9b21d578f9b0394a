"""Reading a local diffusers folder: the parts sampling needs, the checks that it is one kind of model, and
the sampling schedule an LCM folder asks for. Weights load from safetensors only; every failure is one
``ModelError``."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .. import offline
from ..defaults import GUIDANCE_MODES, RENOISE, TIMESTEP_SCHEDULES
from ..errors import ModelError, one_line
from ..models import sdxl
from ..registry import safetensors_files

SAMPLING_FILE = "sampling.json"  # an LCM folder's sampling defaults for latentcm; diffusers ignores the file
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_model_dir(path: str | Path) -> Path:
    """The folder, if it holds a diffusers pipeline with every part sampling needs; else ModelError."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
    read_config(path / "model_index.json")  # a corrupt index is refused, not sampled past
    for sub in PARTS:
        if not (path / sub).is_dir():
            raise ModelError(f"{path} lacks the '{sub}' subfolder")
    return path


def check_kind(unet_config: dict, scheduler_config: dict, path: Path, guidance_mode: str = "embedding") -> None:
    """ModelError for folders that are half LCM: an LCMScheduler needs a guidance-embedding UNet, unless the folder
    is a real-CFG LCM (``guidance_mode`` "cfg" in SAMPLING_FILE), whose UNet has none. (A diffusion scheduler with a
    w input is a guidance-distilled teacher, ``lcm distill --stage guidance``: allowed.)"""
    lcm_sched = scheduler_config.get("_class_name") == "LCMScheduler"
    w_unet = unet_config.get("time_cond_proj_dim") is not None
    if lcm_sched and guidance_mode == "cfg" and w_unet:
        raise ModelError(f"{path}: a real-CFG LCM (guidance_mode cfg) has no w input, but this UNet has "
                         "time_cond_proj_dim: real CFG on a guidance-distilled LCM over-saturates")
    if lcm_sched and guidance_mode != "cfg" and not w_unet:
        raise ModelError(f"{path}: an LCM folder needs both an LCMScheduler and a UNet with time_cond_proj_dim "
                         f"(found scheduler {scheduler_config.get('_class_name')}, time_cond_proj_dim "
                         f"{unet_config.get('time_cond_proj_dim')}); LCM-LoRA folders are not supported")
    if lcm_sched and (scheduler_config.get("thresholding") or scheduler_config.get("clip_sample")):
        raise ModelError(f"{path}: LCMScheduler with thresholding or clip_sample is not supported")


def read_config(file: Path) -> dict:
    """A JSON object from ``file``; ModelError when it cannot be read or is not an object."""
    try:
        found = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file}: {exc}") from None
    if not isinstance(found, dict):
        raise ModelError(f"{file} is not a JSON object")
    return found


def load_part(folder: Path, load, weights: bool = True):
    """Load one subfolder; weights from safetensors only (never a pickle), any failure one ModelError."""
    if weights:
        safetensors_files(folder)
    try:
        return load(folder, local_files_only=True, **({"use_safetensors": True} if weights else {}))
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 -- corrupt configs and weights raise many kinds of error
        raise ModelError(f"cannot load {folder}: {one_line(exc)}") from exc


def load_parts(path: str | Path) -> tuple:
    """(unet, vae, text_encoder, tokenizer, scheduler_config[, text_encoder_2, tokenizer_2,
    force_zeros_for_empty_prompt]) of a local diffusers folder: ``Bundle``'s fields, in order (SDXL: all eight)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_model_dir(path)
    offline.quiet_loading()
    unet = load_part(path / "unet", UNet2DConditionModel.from_pretrained).eval()
    vae = load_part(path / "vae", AutoencoderKL.from_pretrained).eval()
    text_encoder = load_part(path / "text_encoder", CLIPTextModel.from_pretrained).eval()
    tokenizer = load_part(path / "tokenizer", CLIPTokenizer.from_pretrained, weights=False)
    sched = read_config(path / "scheduler" / "scheduler_config.json")
    check_kind(dict(unet.config), sched, path, sampling_settings(path)["guidance_mode"])
    if not sdxl.is_text_time(unet.config):
        return unet, vae, text_encoder, tokenizer, sched, path
    from transformers import CLIPTextModelWithProjection

    if not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir():
        raise ModelError(f"{path} has an SDXL UNet (text_time) but lacks text_encoder_2/ or tokenizer_2/")
    index = read_config(path / "model_index.json")
    return (unet, vae, text_encoder, tokenizer, sched, path,
            load_part(path / "text_encoder_2", CLIPTextModelWithProjection.from_pretrained).eval(),
            load_part(path / "tokenizer_2", CLIPTokenizer.from_pretrained, weights=False),
            bool(index.get("force_zeros_for_empty_prompt", True)))


def sampling_settings(path: Path) -> dict:
    """What an LCM folder's SAMPLING_FILE asks for: {"timestep_schedule": "grid"|"refine", "guidance_mode":
    "embedding"|"cfg", "guidance": default g or None, "unguided_w0": bool, "renoise": "fresh"|"keep-means",
    "unguided": ``parse_unguided``'s};
    an absent key (or an absent file) gives the first choice, None or False. ``unguided_w0``: an LCM with a w
    input distilled from w = 0 (the unguided ODE), so that real CFG at w = 0 can take a negative prompt
    (``sampling.student``). ModelError on a file that is not such an object."""
    file = Path(path) / SAMPLING_FILE
    return parse_sampling(file.read_text() if file.is_file() else "{}", file)


def parse_sampling(text: str, where: Path | str) -> dict:
    """``sampling_settings`` of SAMPLING_FILE's ``text`` (also stored in a single file's metadata); ``where``
    names it in errors."""
    file = where
    try:
        found = json.loads(text)
        found.get("timestep_schedule")
    except (ValueError, AttributeError):
        raise ModelError(f"{file} is not a JSON object with a timestep_schedule") from None
    out = {"timestep_schedule": found.get("timestep_schedule", "grid"),
           "guidance_mode": found.get("guidance_mode", "embedding"), "guidance": found.get("guidance"),
           "unguided_w0": found.get("unguided_w0", False), "renoise": found.get("renoise", RENOISE[0]),
           "unguided": parse_unguided(found.get("unguided"), file)}
    if out["timestep_schedule"] not in TIMESTEP_SCHEDULES:
        raise ModelError(f"{file}: timestep_schedule must be one of {', '.join(TIMESTEP_SCHEDULES)}, "
                         f"got {out['timestep_schedule']!r}")
    if out["guidance_mode"] not in GUIDANCE_MODES:
        raise ModelError(f"{file}: guidance_mode must be one of {', '.join(GUIDANCE_MODES)}, got {out['guidance_mode']!r}")
    if not isinstance(out["unguided_w0"], bool) or (out["unguided_w0"] and out["guidance_mode"] != "embedding"):
        raise ModelError(f"{file}: unguided_w0 must be true or false, and true only with guidance_mode embedding, "
                         f"got {out['unguided_w0']!r}")
    if out["renoise"] not in RENOISE:
        raise ModelError(f"{file}: renoise must be one of {', '.join(RENOISE)}, got {out['renoise']!r}")
    if out["unguided"] is not None and out["guidance_mode"] != "embedding":
        raise ModelError(f"{file}: unguided is for an LCM with a w input (guidance_mode embedding)")
    g = out["guidance"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 1 <= g <= 50):
        raise ModelError(f"{file}: guidance must be a number in [1, 50], got {g!r}")
    return out


def parse_unguided(found, file) -> dict | None:
    """SAMPLING_FILE's ``unguided`` entry, either key optional; None when absent: {"first_step": a LoRA file in the
    folder, applied at the first step from pure noise wherever the w input is 0 (g = 1, or a negative prompt's real
    CFG between w = 0 predictions), "renoise": the re-noising at g = 1 without a negative prompt}."""
    if found is None:
        return None
    if not isinstance(found, dict) or not found or set(found) - {"first_step", "renoise"}:
        raise ModelError(f"{file}: unguided must be an object with first_step and/or renoise, got {found!r}")
    name = found.get("first_step")
    if name is not None and (not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")):
        raise ModelError(f"{file}: unguided first_step must name a .safetensors file in the folder, got {name!r}")
    if found.get("renoise", RENOISE[0]) not in RENOISE:
        raise ModelError(f"{file}: unguided renoise must be one of {', '.join(RENOISE)}, got {found['renoise']!r}")
    return dict(found)


def load_first_step(unet, folder: Path | None, unguided: dict | None) -> torch.nn.Module | None:
    """A copy of ``unet`` with the unguided first-step LoRA (SAMPLING_FILE's ``unguided.first_step``, a file in
    ``folder``; ``models.low_rank``) merged in, or None when the folder names none."""
    from safetensors.torch import load_file

    from ..models.low_rank import merge_lora

    name = (unguided or {}).get("first_step")
    if name is None:
        return None
    file = Path(folder or ".") / name
    if not file.is_file():
        raise ModelError(f"{file} does not exist ({SAMPLING_FILE} names it as the unguided first_step)")
    if not isinstance(unet, torch.nn.Module):
        raise ModelError(f"the unguided first_step LoRA {file} needs the PyTorch UNet, not an exported runtime")
    first = copy.deepcopy(unet)
    try:
        lora = {k: v.float() for k, v in load_file(str(file)).items()}
        first.load_state_dict(merge_lora(first.state_dict(), lora))
    except Exception as exc:  # a corrupt file, a key of another UNet, a shape mismatch: one line for the user
        raise ModelError(f"cannot load the unguided first_step LoRA {file}: {one_line(exc)}") from exc
    return first.eval()


def sampling_schedule(path: Path) -> str:
    """The timestep schedule an LCM folder asks for in SAMPLING_FILE; "grid" (diffusers' selection) without one."""
    found = sampling_settings(path)["timestep_schedule"]
    return found
