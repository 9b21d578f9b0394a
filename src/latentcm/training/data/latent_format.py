"""The latent-shard sample format (``data.prepare`` writes it, ``data.shards`` reads it): safetensors payloads in
webdataset tars, never pickle. See ``data.prepare`` for the layout."""
from __future__ import annotations

import json

import torch

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
