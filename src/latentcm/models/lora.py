"""LoRA files the ecosystem loads: diffusers/peft ``pytorch_lora_weights.safetensors`` and kohya-ss keys.

    peft / diffusers   down_blocks.0.attentions.0.proj_in.lora_A.weight   (A: [r, in, (k, k)])
                       down_blocks.0.attentions.0.proj_in.lora_B.weight   (B: [out, r, (1, 1)])
    kohya-ss           lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (= A)
                       lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     (= B)
                       lora_unet_down_blocks_0_attentions_0_proj_in.alpha              (0-d; scale = alpha / r)

kohya-ss trains SD-1.x on the diffusers UNet, so its module names are the diffusers ones with every
"." made "_"; that is not invertible by itself (``down_blocks`` vs ``down.blocks``), so ``from_kohya``
resolves names against the modules of a UNet.

Also here: the adapter itself (``LoRAConfig``, ``add_lora``) and views of one UNet with one adapter
active (``adapter_mode``, ``AdapterView``, ``AdapterWeights``): LCM-LoRA trains, and samples, through them.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "lcm_lora_kohya.safetensors"
KOHYA_PREFIX = "lora_unet_"
_PEFT_SUFFIX = {"lora_A": "lora_down", "lora_B": "lora_up"}

# diffusers' LCM-LoRA scripts (LCM-LoRA, arXiv 2311.05556; diffusers' LCM-LoRA scripts): every attention projection, the transformer
# in/out projections, the feed-forward layers, and the ResNet convolutions and time projections.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ADAPTER = "lcm"                 # the online adapter (the one exported)
TARGET_ADAPTER = "lcm_target"   # the EMA copy, present only when ema_decay > 0
ADAPTER_KEY_SEP = "__"          # "." in UNet parameter names, in AdapterWeights' (checkpoint) keys


@dataclass(frozen=True)
class LoRAConfig:
    """The LoRA adapter of LCM-LoRA: W = W_0 + (alpha / r) B A on every ``target_modules`` layer of the UNet.

    rank 64 with alpha 64 over ``DEFAULT_TARGETS`` is the released configuration for SD-1.5 (it reproduces the
    report's 67.5M trainable parameters; LCM-LoRA, arXiv 2311.05556). Its layers are 320-1280 wide, so r = 64 is a 1/5-1/20
    slice; on the shipped tiny teacher (64-128 channels) r = 64 would be full rank in the first block, and
    r = 16 keeps about the same ratio.
    """

    rank: int = 64                     # r
    alpha: float | None = None         # lora_alpha; None: alpha = r (scale 1, the scripts' r = alpha = 64)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0                      # initialisation of A (B starts at zero, so the student starts as the teacher)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self):
        """The ``peft.LoraConfig`` (Gaussian A, zero B, as diffusers' LCM-LoRA scripts)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, init_lora_weights="gaussian",
                          target_modules=list(self.target_modules))


def add_lora(unet: torch.nn.Module, cfg: LoRAConfig, adapter_name: str = ADAPTER) -> torch.nn.Module:
    """Freeze ``unet`` and inject a LoRA adapter into it (in place); only the adapter's weights train.

    Returns:
        ``unet``, with ``adapter_name`` active.
    """
    if unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError("LCM-LoRA adapts a plain diffusion UNet; this one already has a w embedding")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(cfg.peft_config(), adapter_name=adapter_name)
    return unet


@contextlib.contextmanager
def adapter_mode(unet: torch.nn.Module, adapter: str | None):
    """Run ``unet`` with only ``adapter`` active, or with every adapter disabled (None); then restore.

    peft's switches also flip ``requires_grad`` of adapter weights; those flags are put back as they were,
    so a switch between the student's forward and the backward pass leaves training alone.
    """
    flags = [(p, p.requires_grad) for n, p in unet.named_parameters() if "lora_" in n]
    active = unet.active_adapters()
    if adapter is None:
        unet.disable_adapters()
    else:
        unet.set_adapter(adapter)
    try:
        yield unet
    finally:
        if adapter is None:
            unet.enable_adapters()
        else:
            unet.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdapterView(torch.nn.Module):
    """``unet`` seen with one adapter (or none, ``adapter=None``): the teacher and EMA-target views of one UNet."""

    def __init__(self, unet: torch.nn.Module, adapter: str | None):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    @property
    def config(self):
        return self.unet.config

    def forward(self, *args, **kwargs):
        with adapter_mode(self.unet, self.adapter):
            return self.unet(*args, **kwargs)


class AdapterWeights(torch.nn.Module):
    """The weights of one adapter, as a module of their own: its state dict is the adapter only (checkpoints).

    The parameters are the UNet's own (shared, not copied), registered under their UNet names with
    ``ADAPTER_KEY_SEP`` for dots and the adapter name left out, so two adapters' state dicts have the same keys.
    """

    def __init__(self, unet: torch.nn.Module, adapter: str):
        super().__init__()
        tag = f".{adapter}."
        found = [(n, p) for n, p in unet.named_parameters() if ".lora_" in n and tag in n]
        if not found:
            raise ValueError(f"the UNet has no adapter {adapter!r}")
        for name, p in found:
            self.register_parameter(name.replace(tag, ".").replace(".", ADAPTER_KEY_SEP), p)


def peft_state_dict(unet: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft keys (``<module>.lora_A.weight``, adapter name left out), on CPU."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def to_kohya(peft_sd: dict[str, torch.Tensor], alpha: float, prefix: str = KOHYA_PREFIX) -> dict[str, torch.Tensor]:
    """peft keys -> kohya-ss keys: lora_A -> lora_down, lora_B -> lora_up, plus one 0-d ``alpha`` per module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_sd.items():
        module, part, leaf = key.removeprefix("unet.").rsplit(".", 2)
        if part not in _PEFT_SUFFIX or leaf != "weight":
            raise ValueError(f"not a LoRA A/B weight: {key!r}")
        name = prefix + module.replace(".", "_")
        out[f"{name}.{_PEFT_SUFFIX[part]}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(kohya_sd: dict[str, torch.Tensor], module_names, prefix: str = KOHYA_PREFIX
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya-ss keys -> (peft state dict, {module: alpha}); ``module_names`` are the UNet's (``named_modules``)."""
    by_kohya = {prefix + n.replace(".", "_"): n for n in module_names if n}
    peft_of = {v: k for k, v in _PEFT_SUFFIX.items()}
    peft_sd, alphas = {}, {}
    for key, value in kohya_sd.items():
        name, rest = key.split(".", 1)
        if name not in by_kohya:
            raise KeyError(f"{key!r} names no module of this UNet")
        if rest == "alpha":
            alphas[by_kohya[name]] = float(value)
            continue
        part, leaf = rest.rsplit(".", 1)
        if part not in peft_of or leaf != "weight":
            raise ValueError(f"not a kohya LoRA key: {key!r}")
        peft_sd[f"{by_kohya[name]}.{peft_of[part]}.weight"] = value
    return peft_sd, alphas


def save_diffusers_lora(unet: torch.nn.Module, dest: str | Path, adapter: str) -> Path:
    """``dest/pytorch_lora_weights.safetensors`` via diffusers, with the LoraConfig (alpha) as metadata."""
    from diffusers import StableDiffusionPipeline

    config = unet.peft_config[adapter].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    StableDiffusionPipeline.save_lora_weights(dest, unet_lora_layers=peft_state_dict(unet, adapter),
                                              unet_lora_adapter_metadata=config, weight_name=DIFFUSERS_NAME,
                                              safe_serialization=True)
    return Path(dest) / DIFFUSERS_NAME


def save_kohya(unet: torch.nn.Module, path: str | Path, adapter: str) -> Path:
    """The adapter in kohya-ss keys (one safetensors file)."""
    from safetensors.torch import save_file

    sd = to_kohya(peft_state_dict(unet, adapter), unet.peft_config[adapter].lora_alpha)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora",
                                        "ss_network_dim": str(unet.peft_config[adapter].r),
                                        "ss_network_alpha": str(unet.peft_config[adapter].lora_alpha)})
    return Path(path)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); weight 1.0 when none is given."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0
