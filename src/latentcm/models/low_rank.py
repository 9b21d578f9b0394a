"""The difference between two UNets of one architecture as a LoRA, by truncated SVD, and its merge.

For each weight W (a linear [out, in] or a convolution [out, in, k, k], flattened to [out, in k k]) the tuned
network's W' gives D = W' - W; its best rank-r approximation (Eckart-Young) is U_r S_r V_r^T, stored as a LoRA
with B = U_r S_r [out, r] and A = V_r^T [r, in k k], so that W + B A approximates W'. The keys and shapes are
those of a diffusers / peft LoRA file (``unet.<module>.lora_A.weight``: A [r, in] or [r, in, k, k];
``lora_B.weight``: B [out, r] or [out, r, 1, 1]), which ``StableDiffusionPipeline.load_lora_weights`` reads; a
layer whose D has rank below r gets zero rows, so every layer has rank r and scale alpha / r = 1. One-dimensional
parameters (norms, biases) are not low-rank and are left out: ``difference_energy`` reports what that drops.
"""
from __future__ import annotations

import torch

LORA_PREFIX = "unet."


def lora_from_difference(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                         rank: int) -> dict[str, torch.Tensor]:
    """The rank-``rank`` LoRA of ``tuned - base`` (two state dicts with the same keys and shapes), float32."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if base.keys() != tuned.keys():
        raise ValueError("the two state dicts have different keys: not one architecture")
    out = {}
    for key, w in base.items():
        if w.ndim < 2 or not key.endswith(".weight"):
            continue
        if tuned[key].shape != w.shape:
            raise ValueError(f"{key}: shape {tuple(tuned[key].shape)} against {tuple(w.shape)}")
        delta = (tuned[key].double() - w.double()).reshape(w.shape[0], -1)  # [out, in k k]
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        b = torch.zeros(w.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :r], a[:r] = u[:, :r] * s[:r], vh[:r]
        module = LORA_PREFIX + key.removesuffix(".weight")
        out[f"{module}.lora_A.weight"] = a.reshape(rank, *w.shape[1:]).float().contiguous()
        out[f"{module}.lora_B.weight"] = b.reshape(w.shape[0], rank, *([1] * (w.ndim - 2))).float().contiguous()
    return out


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
               scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``state`` with W + scale B A on every layer ``lora`` names (``lora_from_difference``'s keys); KeyError for
    a LoRA key that names no weight of ``state``."""
    out = dict(state)
    for key in lora:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        name = module.removeprefix(LORA_PREFIX) + ".weight"
        if name not in state:
            raise KeyError(f"{key!r} names no weight of this UNet")
        a, b, w = lora[key], lora[module + ".lora_B.weight"], state[name]
        delta = b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()  # [out, in k k]
        out[name] = (w.double() + scale * delta.reshape(w.shape)).to(w.dtype)
    return out


def difference_energy(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                      lora: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much of ``tuned - base`` the LoRA keeps: the squared-norm share of the weight differences its layers
    reproduce (``kept``), and the squared-norm share of the whole difference that lies in 1-D parameters, which a
    LoRA cannot hold (``one_dimensional``)."""
    merged = merge_lora(base, lora)
    total = kept_err = one_d = weights = 0.0
    for key, w in base.items():
        d = float(((tuned[key].double() - w.double()) ** 2).sum())
        total += d
        if w.ndim < 2:
            one_d += d
            continue
        weights += d
        kept_err += float(((tuned[key].double() - merged[key].double()) ** 2).sum())
    return {"kept": 1 - kept_err / weights if weights else 1.0, "one_dimensional": one_d / total if total else 0.0}
