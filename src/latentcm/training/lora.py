"""LCM-LoRA (Luo et al. 2023b, arXiv 2311.05556; paper-spec §11): LCD with a LoRA adapter, a strategy of the one loop.

Only what differs from full LCD lives here (style rule 6); the loss, batches, solver target and loop are
``lcd.LCDTask``'s and ``loop.fit``'s. One UNet is in memory and plays three parts:

    student  f_theta   = the UNet with the online adapter ``ADAPTER`` (the only trainable weights)
    teacher            = the same UNet with every adapter disabled (bit-identical to the original teacher)
    target   f_theta^- = the online adapter under no_grad (mu = 0, the released LoRA scripts' choice), or,
                         with ``ema_decay > 0``, a second adapter ``TARGET_ADAPTER`` that is an EMA of the first

There is no w embedding (no ``time_cond_proj_dim``, ``timestep_cond=None``): the guidance w is distilled
in. The paper fixes w = 7.5; the released scripts sample w ~ U[5, 15] without telling the network which
(paper-spec §11). Both are an ``LCDConfig`` (omega_min == omega_max for the fixed one).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.denoiser import ConsistencyModel, Denoiser
from ..solvers import SOLVERS
from .lcd import LCDConfig, LCDData, LCDTask, training_grid
from .teacher import ema_update

# diffusers' LCM-LoRA scripts (paper-spec §11, §12.11): every attention projection, the transformer
# in/out projections, the feed-forward layers, and the ResNet convolutions and time projections.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ADAPTER = "lcm"                 # the online adapter (the one exported)
TARGET_ADAPTER = "lcm_target"   # the EMA copy, present only when ema_decay > 0
ADAPTER_KEY_SEP = "__"          # "." in UNet parameter names, in AdapterWeights' (checkpoint) keys
LORA_OMEGA = 7.5                # the paper's fixed w for LCM-LoRA distillation (report Fig. 2; paper-spec §11)


@dataclass(frozen=True)
class LoRAConfig:
    """The LoRA adapter of LCM-LoRA: W = W_0 + (alpha / r) B A on every ``target_modules`` layer of the UNet.

    rank 64 with alpha 64 over ``DEFAULT_TARGETS`` is the released configuration for SD-1.5 (it reproduces the
    report's 67.5M trainable parameters; paper-spec §11). Its layers are 320-1280 wide, so r = 64 is a 1/5-1/20
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


class LoRATask(LCDTask):
    """LCM-LoRA as a loop Task: ``LCDTask`` whose student is a LoRA adapter on the teacher's own UNet.

    Args:
        teacher_unet: the diffusion UNet; it is frozen and the adapter(s) are injected into it (in place).
        scheduler_config: its diffusers scheduler config.
        data: cached latents and prompt encodings.
        cfg: the LCD variant (solver, k, w range, loss). ``cfg.ema_decay`` is mu of the target: 0 (default of
            ``lcm distill --lora``) uses the online adapter under no_grad, as the released scripts; > 0 keeps
            an EMA copy of the adapter weights only. ``cfg.time_cond_proj_dim`` is unused (no w embedding).
        lora: the adapter.
        preview_fn: preview_fn(unet, step, out_dir) writes a validation grid.
    """

    def __init__(self, teacher_unet, scheduler_config: dict, data: LCDData, cfg: LCDConfig, lora: LoRAConfig, *,
                 preview_fn=None):
        if cfg.target != "solver":
            raise ValueError("LCM-LoRA distils a teacher: LCDConfig.target must be 'solver'")
        self.cfg, self.lora_cfg, self.data, self.preview_fn = cfg, lora, data, preview_fn
        unet = add_lora(teacher_unet, lora).train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.student_unet = unet
        self.teacher = Denoiser(AdapterView(unet, None), scheduler_config)  # adapters off: the frozen teacher
        self.student = ConsistencyModel(Denoiser(unet, scheduler_config))
        self.lora = AdapterWeights(unet, ADAPTER)
        if cfg.ema_decay > 0:
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(lora.peft_config(), adapter_name=TARGET_ADAPTER)
            unet.set_adapter(ADAPTER)  # add_adapter activated the new one; the online adapter trains
            self.lora_target = AdapterWeights(unet, TARGET_ADAPTER)
            self.lora_target.load_state_dict(self.lora.state_dict())  # theta^- <- theta
            self.target = ConsistencyModel(Denoiser(AdapterView(unet, TARGET_ADAPTER), scheduler_config))
        else:
            self.lora_target = None
            self.target = ConsistencyModel(Denoiser(unet, scheduler_config))  # called under no_grad by loss
        self.target_unet = unet
        self.alpha_bar = self.student.denoiser.alpha_bar  # [T] float64
        self.grid = training_grid(len(self.alpha_bar), cfg.skip)  # [N]
        self.solver = SOLVERS[cfg.solver]
        self.device = self.alpha_bar.device

    def modules(self):
        """Only the adapter weights are checkpointed: the base UNet is the teacher folder's, unchanged."""
        found = {"lora": self.lora}
        if self.lora_target is not None:
            found["lora_target"] = self.lora_target
        return found

    def parameters(self):
        return list(self.lora.parameters())

    def w_embedding(self, omega: torch.Tensor, dtype: torch.dtype) -> None:
        """No w embedding: the guidance is distilled in (paper-spec §11)."""
        return None

    def after_update(self, step: int) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta over the adapter weights; nothing to do when mu = 0."""
        if self.lora_target is not None:
            ema_update(self.lora_target, self.lora, self.cfg.ema_decay)


# --- export ---------------------------------------------------------------------------------------

LORA_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [lcm-lora, lcm, latent-consistency-model, lora, latentcm, text-to-image]
---

# {title}

LCM-LoRA (Luo et al. 2023, arXiv 2311.05556): Latent Consistency Distillation (arXiv 2310.04378,
Algorithm 1) of the teacher `{teacher}` into a rank-{rank} LoRA adapter of its UNet (alpha {alpha}),
made with latentcm. The adapter has no guidance embedding: the guidance was distilled in
({guidance}; paper convention, g = 1 + w). Sample with an `LCMScheduler`,
1-8 steps, `guidance_scale` 1 (one UNet pass per step).

Files: `pytorch_lora_weights.safetensors` (diffusers/peft keys), `lcm_lora_kohya.safetensors`
(kohya-ss keys: `lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`) and
`scheduler_config.json` (the `LCMScheduler` of the training grid).

## Command that made it

```bash
{command}
```

## Distillation settings

| setting | value |
|---|---|
| LoRA rank / alpha / target modules | {rank} / {alpha} / {targets} |
| ODE solver | {solver} |
| skipping interval k / `original_inference_steps` | {skip} / {n_grid} |
| target | {target} |
| distance | {loss} |
| steps x batch | {steps} x {batch} |
| learning rate | {lr} |

## Use

```python
from diffusers import LCMScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{teacher}")
pipe.scheduler = LCMScheduler.from_pretrained("<this folder>")
pipe.load_lora_weights("<this folder>")
image = pipe("a large red circle on a blue background", num_inference_steps=4, guidance_scale=1.0).images[0]
```

or `lcm generate "a large red circle on a blue background" --model {teacher} --lora <this folder>`.
"""


def write_lora_card(folder: Path, info: dict) -> Path:
    """README.md with YAML front matter (library_name: diffusers, tags lcm-lora) and the command."""
    lcd, lora, loop = info.get("lcd", {}), info.get("lora", {}), info.get("loop", {})
    mu = lcd.get("ema_decay", 0.0)
    text = LORA_CARD.format(
        title=info.get("title", f"LCM-LoRA distilled from `{info.get('teacher', '?')}`"),
        teacher=info.get("teacher", "?"), rank=lora.get("rank", "?"),
        alpha=lora.get("alpha") or lora.get("rank", "?"), targets=", ".join(lora.get("target_modules", ())),
        guidance=(f"fixed w = {lcd.get('omega_min', '?')}" if lcd.get("omega_min") == lcd.get("omega_max")
                  else f"w ~ U[{lcd.get('omega_min', '?')}, {lcd.get('omega_max', '?')}]"),
        command=info.get("command") or "# made through the Python API: latentcm.training.lcd.distill",
        solver=lcd.get("solver", "?"), skip=info.get("skip", "?"), n_grid=info.get("n_grid", "?"),
        target="online adapter under no_grad (mu = 0)" if not mu else f"EMA of the adapter, mu = {mu}",
        loss=lcd.get("loss", "?") + (f" (c = {lcd['huber_c']})" if lcd.get("loss") == "huber" else ""),
        steps=info.get("steps", "?"), batch=lcd.get("batch_size", "?"), lr=loop.get("lr", "?"))
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path


def export_lcm_lora(unet: torch.nn.Module, scheduler_config: dict, dest: str | Path, info: dict, *,
                    skip: int = 20) -> Path:
    """Write the online adapter into ``dest``: diffusers + kohya safetensors, LCMScheduler config, model card.

    Args:
        unet: the UNet carrying the ``ADAPTER`` adapter.
        scheduler_config: the teacher's scheduler config (betas, prediction type).
        dest: output folder (other files in it, such as checkpoints, are left alone).
        info: what the card reports: command, teacher, steps, lcd, lora, loop.
        skip: k of the training grid (``original_inference_steps`` = T // k).
    """
    from diffusers import LCMScheduler

    from ..models import lora_io
    from .export import lcm_scheduler_config

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sched = LCMScheduler(**lcm_scheduler_config(scheduler_config, skip))
    sched.save_config(dest)
    lora_io.save_diffusers_lora(unet, dest, ADAPTER)
    lora_io.save_kohya(unet, dest / lora_io.KOHYA_NAME, ADAPTER)
    write_lora_card(dest, {**info, "skip": skip, "n_grid": sched.config.original_inference_steps})
    return dest
