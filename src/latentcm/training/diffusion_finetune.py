"""Plain diffusion fine-tuning of a teacher on a user's image folder: the usual way to adapt a
model before LCF existed (fine-tune the teacher, then distil again). It is the baseline LCF is
compared against, and a tool in its own right. The same ``UNetTask`` as the teacher build
(epsilon-prediction, min-SNR-5, 10% caption dropout, EMA) on the one training loop.
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


def finetune_teacher(teacher_dir: str | Path, data_dir: str | Path, out: str | Path, loop_cfg: LoopConfig, *,
                     batch_size: int = 32, seed: int = 0, ema_decay: float = 0.999, resume: bool = False,
                     command: str = "") -> tuple[int, Path | None, str]:
    """Fine-tune the teacher's UNet on ``data_dir``; ``out`` becomes a StableDiffusionPipeline folder.

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
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    task = UNetTask(unet, ema, bundle.text_encoder, bundle.tokenizer, latents, None, seed, batch_size,
                    ema_decay=ema_decay, captions=captions)
    done = fit(task, loop_cfg, out, resume, desc="finetune-teacher")
    if done < loop_cfg.max_steps:
        return done, None, report.summary()
    ema.save_pretrained(out / "unet")
    for part in COPIED_PARTS:
        src = Path(bundle.path) / part
        (shutil.copytree(src, out / part, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, out / part))
    (out / "finetune.json").write_text(json.dumps(
        {"command": command, "teacher": str(teacher_dir), "data": str(data_dir), "steps": done,
         "data_report": report.summary(), "minutes_this_session": round((time.time() - t0) / 60, 2)}, indent=2))
    return done, out, report.summary()


__all__ = ["finetune_teacher"]
