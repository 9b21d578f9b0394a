"""A whole LCM (or teacher) in one ``.safetensors`` file in the original Stable Diffusion checkpoint layout
(``ldm_keys``: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``), which
diffusers' ``from_single_file`` reads, and the loader that restores a ``Bundle`` from it.

The LCM's guidance embedding (LCM Sec. 4.2: the UNet's ``time_embedding.cond_proj``, ``time_cond_proj_dim``) has
no name in that layout and diffusers' loader leaves it unloaded, so the file bakes one guidance scale g into
the time embedding: ``linear_1(t_emb + cond_proj(e(w)))`` = ``W1 t_emb + (b1 + W1 cond_proj(e(w)))`` with
w = g - 1, an exact identity for that w. diffusers then loads the UNet without ``cond_proj`` and samples the LCM
at g with no classifier-free guidance::

    pipe = StableDiffusionPipeline.from_single_file(file, config=<the exported folder>, local_files_only=True,
                                                    time_cond_proj_dim=None)
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)

Also stored, for latentcm's own reader (other readers ignore them): the two unbaked tensors
(``latentcm.time_embedding.cond_proj.weight``, ``latentcm.time_embedding.linear_1.bias``) and metadata
``format`` "latentcm.single_file/2", ``guidance_scale``, an LCM's sampling settings (``sampling``: the folder's
SAMPLING_FILE: timestep schedule, guidance mode, default g), the component configs as JSON and the tokenizer files.
``load_single_file`` also reads the older "latentcm.single_file/1" files (keys ``unet.*``, ``vae.*``,
``text_encoder.*`` in diffusers / transformers names).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..bundle import Bundle, ModelError, check_kind, parse_sampling
from ..files import atomic_path
from ..guidance import omega_from_guidance
from ..models.denoiser import COND_PROJ_KEY as COND_PROJ, LINEAR_1_BIAS, fold_omega
from . import ldm_keys

FORMAT = "latentcm.single_file/2"
OLD_FORMAT = "latentcm.single_file/1"
PARTS = ("unet", "vae", "text_encoder")
EXTRA_PREFIX = "latentcm."  # the unbaked guidance tensors, outside every prefix the SD layout reads
NOT_IN_LAYOUT = ("the LCM's guidance embedding (time_cond_proj_dim) has no place in the Stable Diffusion "
                 "checkpoint layout: the single file bakes guidance scale {g:g} into the UNet (load it with "
                 "time_cond_proj_dim=None, sample with guidance_scale=1)")


def bake_guidance(unet_state: dict[str, torch.Tensor], guidance: float) -> dict[str, torch.Tensor]:
    """A copy of a w-conditioned UNet's state dict with the embedding of w = g - 1 folded into
    ``time_embedding.linear_1``'s bias and ``cond_proj`` dropped (``models.denoiser.fold_omega``)."""
    return fold_omega(unet_state, omega_from_guidance(float(guidance)))


def check_layout(bundle) -> None:
    """ModelError unless ``bundle`` has the Stable Diffusion 1.x/2.x shape the checkpoint layout names."""
    if bundle.is_sdxl:
        raise ModelError("--single-file writes the Stable Diffusion 1.x/2.x checkpoint layout; SDXL is not supported")
    config = dict(bundle.unet.config)
    if config.get("class_embed_type") or config.get("addition_embed_type") or config.get("num_class_embeds"):
        raise ModelError("--single-file: a UNet with class or added embeddings has no Stable Diffusion 1.x layout")
    if config.get("mid_block_type") != "UNetMidBlock2DCrossAttn" or not isinstance(config["layers_per_block"], int):
        raise ModelError("--single-file: only the Stable Diffusion UNet shape (UNetMidBlock2DCrossAttn, one "
                         "layers_per_block) has a single-file layout")


def ldm_tensors(bundle, guidance: float | None = None) -> dict[str, torch.Tensor]:
    """Every network weight of ``bundle`` under its original Stable Diffusion checkpoint name, plus the unbaked
    guidance tensors (``EXTRA_PREFIX``) when the UNet is w-conditioned (``guidance``: the baked g)."""
    check_layout(bundle)
    unet_state = {k: v.detach().cpu() for k, v in bundle.unet.state_dict().items()}
    out = {}
    if COND_PROJ in unet_state:
        out = {EXTRA_PREFIX + k: unet_state[k] for k in (COND_PROJ, LINEAR_1_BIAS)}
        unet_state = bake_guidance(unet_state, guidance)
    parts = ((unet_state, ldm_keys.unet_blocks(dict(bundle.unet.config)), ldm_keys.UNET_PREFIX),
             (bundle.vae.state_dict(), ldm_keys.vae_blocks(dict(bundle.vae.config)), ldm_keys.VAE_PREFIX),
             (bundle.text_encoder.state_dict(), None, ldm_keys.TEXT_PREFIX))
    for state, blocks, prefix in parts:
        named, unmapped = ldm_keys.to_ldm(state, blocks, prefix)
        if unmapped:
            raise ModelError(f"--single-file: {unmapped[0]} has no name in the Stable Diffusion checkpoint layout")
        out.update(named)
    return {k: v.detach().cpu() for k, v in out.items()}


def _tokenizer_files(tokenizer) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return json.dumps({p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()})


def save_single_file(bundle, path: str | Path, dtype: torch.dtype | None = None,
                     guidance: float | None = None) -> Path:
    """Write ``bundle`` (weights cast to ``dtype`` if given) as one .safetensors file in the Stable Diffusion
    checkpoint layout (atomically). ``guidance``: the scale g baked into an LCM's UNet (default the model's)."""
    from safetensors.torch import save_file

    path = Path(path)
    guidance = bundle.defaults[2] if guidance is None else guidance
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in ldm_tensors(bundle, guidance).items()}
    metadata = {"format": FORMAT, "scheduler_config": json.dumps(bundle.scheduler_config),
                "tokenizer": _tokenizer_files(bundle.tokenizer),
                "unet_config": bundle.unet.to_json_string(), "vae_config": bundle.vae.to_json_string(),
                "text_encoder_config": bundle.text_encoder.config.to_json_string()}
    if EXTRA_PREFIX + COND_PROJ in tensors:
        metadata["guidance_scale"] = json.dumps(guidance)
    if bundle.is_lcm:
        metadata["sampling"] = json.dumps(bundle.sampling_file())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _old_layout(tensors: dict[str, torch.Tensor], modules: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per-part state dicts of a "latentcm.single_file/1" file (``<part>.<diffusers key>``; ``modules`` unused)."""
    parts = {part: {} for part in PARTS}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    return parts


def _ldm_layout(tensors: dict[str, torch.Tensor], modules: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per-part state dicts of a "latentcm.single_file/2" file: the inverse renaming, the unbaked guidance
    tensors put back."""
    unet, vae = modules["unet"], modules["vae"]
    extra = [k for k in (COND_PROJ, LINEAR_1_BIAS) if EXTRA_PREFIX + k in tensors]
    skip = (COND_PROJ,) if COND_PROJ in unet.state_dict() else ()
    try:
        parts = {"unet": ldm_keys.from_ldm(tensors, unet, ldm_keys.unet_blocks(dict(unet.config)),
                                           ldm_keys.UNET_PREFIX, skip),
                 "vae": ldm_keys.from_ldm(tensors, vae, ldm_keys.vae_blocks(dict(vae.config)), ldm_keys.VAE_PREFIX),
                 "text_encoder": ldm_keys.from_ldm(tensors, modules["text_encoder"], None, ldm_keys.TEXT_PREFIX)}
    except KeyError as exc:
        raise ModelError(f"the single file lacks the tensor {exc.args[0]}") from None
    if skip and len(extra) < 2:
        raise ModelError(f"the single file lacks {EXTRA_PREFIX}{COND_PROJ}, the LCM's guidance embedding")
    parts["unet"].update({k: tensors[EXTRA_PREFIX + k] for k in extra})
    return parts


def _modules(meta: dict) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {"unet": UNet2DConditionModel.from_config(json.loads(meta["unet_config"])),
            "vae": AutoencoderKL.from_config(json.loads(meta["vae_config"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(json.loads(meta["text_encoder_config"])))}


def load_single_file(path: str | Path):
    """The ``Bundle`` stored by ``save_single_file`` (in the file's dtype, on the CPU, eval mode); reads both
    "latentcm.single_file/2" (SD checkpoint layout) and the older "latentcm.single_file/1" files."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") not in (FORMAT, OLD_FORMAT):
        raise ModelError(f"{path} is not a latentcm single file (format {meta.get('format')!r}, want {FORMAT!r}); "
                         "load other checkpoints with diffusers' from_single_file")
    modules = _modules(meta)
    parts = (_ldm_layout if meta["format"] == FORMAT else _old_layout)(load_file(str(path)), modules)
    for part, module in modules.items():
        module.to(next(v.dtype for v in parts[part].values() if v.is_floating_point()))
        module.load_state_dict(parts[part], strict=True)
        module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in json.loads(meta["tokenizer"]).items():
            (Path(tmp) / name).write_text(text)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler_config = json.loads(meta["scheduler_config"])
    settings = parse_sampling(meta.get("sampling", "{}"), f"{path}'s sampling metadata")
    check_kind(dict(modules["unet"].config), scheduler_config, path, settings["guidance_mode"])
    bundle = Bundle(modules["unet"], modules["vae"], modules["text_encoder"], tokenizer, scheduler_config, None)
    return bundle.use_sampling(settings) if bundle.is_lcm else bundle
