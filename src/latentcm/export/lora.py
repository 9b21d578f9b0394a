"""LoRA folders for others to load: an LCM-LoRA (diffusers + kohya files, its LCMScheduler config, a card)
and a style LoRA (plain-diffusion adapter that stacks with an LCM-LoRA; LCM-LoRA report Sec. 3.3)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..bundle import SAMPLING_FILE
from ..defaults import SKIP
from ..files import write_text
from ..models import lora as L
from ..schedules import lcm_scheduler_config
from .pipeline import check_schedule, write_sampling

STYLE_ADAPTER = "style"
STYLE_KOHYA_NAME = "style_lora_kohya.safetensors"

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
Timestep schedule: `{schedule}` (named in `{sampling_file}` beside the scheduler config; diffusers ignores it).
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
        command=info.get("command") or "# made through the Python API: latentcm.training.recipes.run",
        solver=lcd.get("solver", "?"), skip=info.get("skip", "?"), n_grid=info.get("n_grid", "?"),
        target="online adapter under no_grad (mu = 0)" if not mu else f"EMA of the adapter, mu = {mu}",
        loss=lcd.get("loss", "?") + (f" (c = {lcd['huber_c']})" if lcd.get("loss") == "huber" else ""),
        steps=info.get("steps", "?"), batch=lcd.get("batch_size", "?"), lr=loop.get("lr", "?"),
        schedule=info.get("schedule", "grid"), sampling_file=SAMPLING_FILE)
    return write_text(Path(folder) / "README.md", text)


def export_lcm_lora(unet: torch.nn.Module, scheduler_config: dict, dest: str | Path, info: dict, *,
                    skip: int = SKIP, schedule: str = "grid") -> Path:
    """Write the online adapter into ``dest``: diffusers + kohya safetensors, LCMScheduler config with its
    ``SAMPLING_FILE``, model card.

    Args:
        unet: the UNet carrying the ``ADAPTER`` adapter.
        scheduler_config: the teacher's scheduler config (betas, prediction type).
        dest: output folder (other files in it, such as checkpoints, are left alone).
        info: what the card reports: command, teacher, steps, lcd, lora, loop.
        skip: k of the training grid (``original_inference_steps`` = T // k).
        schedule: the timestep schedule latentcm samples with the adapter by default (``defaults.TIMESTEP_SCHEDULES``).
    """
    from diffusers import LCMScheduler

    check_schedule(schedule)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sched = LCMScheduler(**lcm_scheduler_config(scheduler_config, skip))
    sched.save_config(dest)
    write_sampling(dest, schedule)
    L.save_diffusers_lora(unet, dest, L.ADAPTER)
    L.save_kohya(unet, dest / L.KOHYA_NAME, L.ADAPTER)
    write_lora_card(dest, {**info, "skip": skip, "n_grid": sched.config.original_inference_steps, "schedule": schedule})
    return dest


STYLE_LORA_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
base_model: {teacher}
tags: [lora, latentcm, text-to-image]
---

# Style LoRA of `{teacher}`

A rank-{rank} LoRA (alpha {alpha}) of the UNet of `{teacher}`, trained with plain diffusion
(epsilon-prediction, min-SNR-5, 10% caption dropout, EMA of the adapter) on the image folder
`{data}` ({report}), {steps} steps, made with latentcm. It is a diffusion LoRA: sample it with the
teacher's own samplers, or stack it with an LCM-LoRA for 4-step sampling (the LCM-LoRA report's
lambda1 tau' + lambda2 tau_LCM, there 0.8 and 1.0):

```bash
lcm generate "a red striped circle on a blue background" --model {teacher} --lora LCM_LORA_DIR --lora <this folder>:0.8
```

Files: `pytorch_lora_weights.safetensors` (diffusers/peft keys) and `style_lora_kohya.safetensors`
(kohya-ss keys).

## Command that made it

```bash
{command}
```
"""


def export_style_lora(unet, dest: Path, info: dict) -> Path:
    """The style adapter of ``unet`` as diffusers + kohya LoRA files and a model card in ``dest``."""
    L.save_diffusers_lora(unet, dest, STYLE_ADAPTER)
    L.save_kohya(unet, dest / STYLE_KOHYA_NAME, STYLE_ADAPTER)
    cfg = unet.peft_config[STYLE_ADAPTER]
    write_text(dest / "README.md", STYLE_LORA_CARD.format(rank=cfg.r, alpha=cfg.lora_alpha, **info))
    return dest
