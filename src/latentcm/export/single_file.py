"""A whole LCM (or teacher) in one ``.safetensors`` file, and the loader that restores a ``Bundle`` from it.

Layout (latentcm's own; NOT the A1111 / ComfyUI "original Stable Diffusion" checkpoint layout, whose keys
are ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` in CompVis naming):

    tensors   unet.<key>           diffusers ``UNet2DConditionModel.state_dict()`` keys
              vae.<key>            diffusers ``AutoencoderKL.state_dict()`` keys
              text_encoder.<key>   transformers ``CLIPTextModel.state_dict()`` keys
    metadata  format               "latentcm.single_file/1"
              unet_config, vae_config, text_encoder_config, scheduler_config
                                   the component configs as JSON strings
              tokenizer            JSON object {file name: text} of the saved ``CLIPTokenizer`` files

So one file restores every part sampling needs, with no folder and no download.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..bundle import Bundle, ModelError, check_kind
from ..files import atomic_path

FORMAT = "latentcm.single_file/1"
PARTS = ("unet", "vae", "text_encoder")


def single_file_tensors(bundle, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every network weight of ``bundle`` under its part's prefix (``unet.``, ``vae.``, ``text_encoder.``)."""
    out = {}
    for part in PARTS:
        for key, value in getattr(bundle, part).state_dict().items():
            value = value.detach().cpu()
            out[f"{part}.{key}"] = (value.to(dtype) if dtype is not None and value.is_floating_point()
                                    else value).contiguous()
    return out


def _tokenizer_files(tokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return json.dumps({p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()})


def save_single_file(bundle, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` (weights cast to ``dtype`` if given) as one .safetensors file in the layout above
    (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": FORMAT, "scheduler_config": json.dumps(bundle.scheduler_config),
                "tokenizer": _tokenizer_files(bundle.tokenizer),
                "unet_config": bundle.unet.to_json_string(), "vae_config": bundle.vae.to_json_string(),
                "text_encoder_config": bundle.text_encoder.config.to_json_string()}
    with atomic_path(path) as tmp:
        save_file(single_file_tensors(bundle, dtype), str(tmp), metadata=metadata)
    return path


def _split(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts = {part: {} for part in PARTS}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    return parts


def load_single_file(path: str | Path):
    """The ``Bundle`` stored by ``save_single_file`` (in the file's dtype, on the CPU, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a latentcm single file (format {meta.get('format')!r}, want {FORMAT!r})")
    parts = _split(load_file(str(path)))
    unet = UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    vae = AutoencoderKL.from_config(json.loads(meta["vae_config"]))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(json.loads(meta["text_encoder_config"])))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to(next(v.dtype for v in parts[part].values() if v.is_floating_point()))
        module.load_state_dict(parts[part], strict=True)
        module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in json.loads(meta["tokenizer"]).items():
            (Path(tmp) / name).write_text(text)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler_config = json.loads(meta["scheduler_config"])
    check_kind(dict(unet.config), scheduler_config, path)
    return Bundle(unet, vae, text_encoder, tokenizer, scheduler_config, None)
