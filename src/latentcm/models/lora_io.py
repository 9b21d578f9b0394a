"""LoRA files the ecosystem loads: diffusers/peft ``pytorch_lora_weights.safetensors`` and kohya-ss keys.

    peft / diffusers   down_blocks.0.attentions.0.proj_in.lora_A.weight   (A: [r, in, (k, k)])
                       down_blocks.0.attentions.0.proj_in.lora_B.weight   (B: [out, r, (1, 1)])
    kohya-ss           lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (= A)
                       lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     (= B)
                       lora_unet_down_blocks_0_attentions_0_proj_in.alpha              (0-d; scale = alpha / r)

kohya-ss trains SD-1.x on the diffusers UNet, so its module names are the diffusers ones with every
"." made "_"; that is not invertible by itself (``down_blocks`` vs ``down.blocks``), so ``from_kohya``
resolves names against the modules of a UNet.

Also here: loading LoRA files into a ``Bundle`` for sampling (``apply_loras``), stacked with weights.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_NAME = "lcm_lora_kohya.safetensors"
KOHYA_PREFIX = "lora_unet_"
_PEFT_SUFFIX = {"lora_A": "lora_down", "lora_B": "lora_up"}


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


def apply_loras(bundle, loras: list[tuple[str, float]]):
    """Load LoRA files (diffusers or kohya keys; a folder or a .safetensors file) into a teacher bundle's UNet,
    stacked with their weights, and make the bundle an LCM for ``sampler="lcm"`` (in place; returns it).

    The LCMScheduler config is the first LoRA folder's ``scheduler_config.json`` when it has one (the training
    grid), else the teacher's betas with ``original_inference_steps`` 50. A UNet without a w embedding samples
    with ``timestep_cond=None``: an LCM-LoRA's guidance is distilled in.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..training.export import lcm_scheduler_config
    from .bundle import ModelError

    if bundle.is_lcm:
        raise ModelError(f"{bundle.path} is already an LCM; load an LCM-LoRA onto a diffusion teacher folder")
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=DDIMScheduler.from_config(bundle.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = []
    for i, (path, _) in enumerate(loras):
        path = Path(path)
        if not path.exists():
            raise ModelError(f"LoRA {path} does not exist")
        kw = {"weight_name": path.name} if path.is_file() else {}
        with warnings.catch_warnings():  # peft warns on every adapter after the first: stacking is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=f"lora{i}", **kw)
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    first = Path(loras[0][0])
    sched_file = first / "scheduler_config.json"
    if first.is_dir() and sched_file.is_file():
        sched = json.loads(sched_file.read_text())
    else:
        num_train = bundle.scheduler_config.get("num_train_timesteps", 1000)
        sched = {"_class_name": "LCMScheduler", **lcm_scheduler_config(bundle.scheduler_config, num_train // 50)}
    if sched.get("_class_name") != "LCMScheduler":
        raise ModelError(f"{sched_file} is not an LCMScheduler config")
    bundle.scheduler_config = sched
    bundle.applied_loras = [(str(Path(path).resolve()), float(w)) for path, w in loras]  # names sample caches
    return bundle
