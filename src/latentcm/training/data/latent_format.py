"""The latent-shard sample format (``data.prepare`` writes it, ``data.shards`` reads it): safetensors payloads in
webdataset tars, never pickle. See ``data.prepare`` for the layout."""
from __future__ import annotations

import hashlib
import json

import torch

from ...errors import ModelError

FORMAT, VERSION = "latentcm-latents", 1
META_KEY = "__meta__"


def sample_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes (never pickle)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def read_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors; anything else is a ValueError."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 -- any bytes: one clear error for the caller to count or raise
        raise ValueError(f"not a safetensors payload ({type(exc).__name__})") from None


def vae_config_hash(vae_config) -> str:
    """A short hash of a VAE's config (its architecture and scaling factor; diffusers' ``_`` keys left out): latents
    of VAEs with different hashes live in different spaces."""
    config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_latent_sample(sample: dict) -> bool:
    return "latent.safetensors" in sample


def read_meta(sample: dict) -> dict:
    """The ``__meta__`` sample of a latent shard: its json, plus ``uncond_states`` for stored states."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError):
        raise ValueError("latent shard has an unreadable __meta__.json") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"not a latentcm latent shard (format {meta.get('format')!r} version {meta.get('version')!r})")
    if meta.get("text") == "states":
        if "uncond.safetensors" not in sample:
            raise ValueError("latent shard with text states lacks __meta__.uncond.safetensors")
        meta["uncond_states"] = read_tensors(sample["uncond.safetensors"])["uncond_states"].float()
    return meta


def check_model(meta: dict, bundle, url: str) -> None:
    """Latent shards were encoded for one model's latent space and resolution: refuse another's (one line)."""
    unet = bundle.unet.config
    if meta["latent_shape"][0] != unet.in_channels:
        raise ValueError(f"latent shard {url} holds {meta['latent_shape'][0]}-channel latents; the model takes "
                         f"{unet.in_channels}")
    if meta["resolution"] != bundle.default_size:
        raise ValueError(f"latent shard {url} was prepared at {meta['resolution']} px; the model samples at "
                         f"{bundle.default_size} px (prepare again with this model)")
    _check_latent_space(meta, bundle, url)
    if meta["text"] == "states" and not getattr(bundle, "is_sdxl", False) \
            and meta.get("text_shape", [0, unet.cross_attention_dim])[-1] != unet.cross_attention_dim:
        raise ValueError(f"latent shard {url} holds text states of width {meta['text_shape'][-1]}; the model's "
                         f"cross-attention takes {unet.cross_attention_dim} (prepare with --text captions, or "
                         f"with this model)")


def _check_latent_space(meta: dict, bundle, url: str) -> None:
    """Latents of another model's VAE (another latent shape, or another VAE config where recorded) are refused."""
    side = bundle.default_size // bundle.vae_factor
    expected = [bundle.unet.config.in_channels, side, side]
    ours = vae_config_hash(bundle.vae.config)
    theirs = meta.get("vae_config_hash", ours)  # shards of older versions record no hash: the shape decides
    if list(meta["latent_shape"]) != expected or theirs != ours:
        raise ModelError(f"latent shard {url} was prepared by {meta.get('model')} (latents {meta['latent_shape']}, "
                         f"VAE config {theirs}); the teacher {bundle.path} makes latents {expected} (VAE config "
                         f"{ours}): prepare again with --model {bundle.path}")
