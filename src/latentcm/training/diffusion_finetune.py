"""Plain diffusion fine-tuning of a teacher on a user's image folder: the usual way to adapt a
model before LCF existed (fine-tune the teacher, then distil again). It is the baseline LCF is
compared against, and a tool in its own right. The same ``UNetTask`` as the teacher build
(epsilon-prediction, min-SNR-5, 10% caption dropout, EMA) on the one training loop.

With a ``LoRAConfig`` only a LoRA adapter trains and the result is a *style LoRA* (the paper's
tau', LCM-LoRA report Sec. 3.3): a folder of diffusers + kohya LoRA files that stacks with an
LCM-LoRA (``lcm generate --lora LCM_LORA --lora STYLE_LORA:0.8``).
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from .lcf import folder_latents_and_captions
from .loop import LoopConfig, check_fresh, fit
from .teacher import UNetTask

COPIED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


STYLE_ADAPTER = "style"
STYLE_KOHYA_NAME = "style_lora_kohya.safetensors"

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
    from ..models import lora_io

    lora_io.save_diffusers_lora(unet, dest, STYLE_ADAPTER)
    lora_io.save_kohya(unet, dest / STYLE_KOHYA_NAME, STYLE_ADAPTER)
    cfg = unet.peft_config[STYLE_ADAPTER]
    (dest / "README.md").write_text(STYLE_LORA_CARD.format(rank=cfg.r, alpha=cfg.lora_alpha, **info))
    return dest


def finetune_teacher(teacher_dir: str | Path, data_dir: str | Path, out: str | Path, loop_cfg: LoopConfig, *,
                     batch_size: int = 32, seed: int = 0, ema_decay: float = 0.999, resume: bool = False,
                     command: str = "", lora=None) -> tuple[int, Path | None, str]:
    """Fine-tune the teacher's UNet on ``data_dir``; ``out`` becomes a StableDiffusionPipeline folder,
    or, with ``lora`` (a ``LoRAConfig``), a style-LoRA folder (only the adapter trains).

    Returns:
        (steps done, ``out`` once finished or None when a time limit stopped it, the load summary).
    """
    from ..models.bundle import Bundle, ModelError

    out, t0 = Path(out), time.time()
    check_fresh(out, resume)
    bundle = Bundle.load(teacher_dir)
    if bundle.is_lcm:
        raise ModelError(f"{bundle.path} is an LCM; fine-tune it with `lcm finetune` (LCF) instead")
    out.mkdir(parents=True, exist_ok=True)
    latents, captions, report = folder_latents_and_captions(bundle, Path(data_dir))
    unet = bundle.unet.train().requires_grad_(True)
    if lora is not None:
        from .lora import add_lora

        add_lora(unet, lora, adapter_name=STYLE_ADAPTER)  # base frozen; B = 0, so it starts as the teacher
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    task = UNetTask(unet, ema, bundle.text_encoder, bundle.tokenizer, latents, None, seed, batch_size,
                    ema_decay=ema_decay, captions=captions)
    done = fit(task, loop_cfg, out, resume, desc="finetune-teacher")
    if done < loop_cfg.max_steps:
        return done, None, report.summary()
    if lora is not None:
        export_style_lora(ema, out, {"teacher": str(teacher_dir), "data": str(data_dir), "report": report.summary(),
                                     "steps": done, "command": command or "# Python API: finetune_teacher(lora=...)"})
        return done, out, report.summary()
    ema.save_pretrained(out / "unet")
    for part in COPIED_PARTS:
        src = Path(bundle.path) / part
        (shutil.copytree(src, out / part, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, out / part))
    (out / "finetune.json").write_text(json.dumps(
        {"command": command, "teacher": str(teacher_dir), "data": str(data_dir), "steps": done,
         "data_report": report.summary(), "minutes_this_session": round((time.time() - t0) / 60, 2)}, indent=2))
    return done, out, report.summary()


__all__ = ["finetune_teacher"]
