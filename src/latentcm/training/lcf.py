"""Latent Consistency Fine-tuning (LCF; paper Sec. 4.4, paper-spec §9): adapt an LCM to a user's
image-caption folder without a teacher, keeping few-step sampling.

The same ``LCDTask`` and training loop as distillation, with the variant as data:
``LCDConfig(target="same-noise")``. Both points of the consistency loss come from the same latent
and the same noise, z_{t_{n+k}} = a(t_{n+k}) z + s(t_{n+k}) eps and z_{t_n} = a(t_n) z + s(t_n) eps,
and the EMA target network maps z_{t_n}; there is no teacher and no ODE solver.

Choices the paper leaves open (its Algorithm 4 text is unverified, §9), and why:
* the shared eps: consistency training's unbiased one-sample estimate of the ODE step, and what the
  re-implementations we know of do;
* the student starts from the LCM and the EMA target from the same weights (mu = 0.95 by default,
  the rate the LCM was distilled with; a slower EMA barely moves in a few hundred steps);
* k defaults to the LCM's own grid (T // original_inference_steps), so the exported scheduler keeps
  the grid the model was distilled on;
* only the low-noise half of the grid trains by default (t_{n+k} <= 499, ``LCDConfig.max_timestep``):
  a style is texture, decided in the last sampling steps, while layout and attributes are decided
  at high noise. Training every t let the biased one-sample target drift the high-noise end (objects
  shrank, backgrounds grew texture; attribute accuracy fell) before the style arrived; with t <= 499
  FID and style both improve and attributes hold (reports/lcf, README). This choice is ours, not
  the paper's;
* the text encoder and VAE stay frozen, as in distillation; only the UNet learns.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

from ..imagefolder import LoadReport, load_pairs
from .lcd import LCDConfig, LCDData, LCDTask, bundle_text_fns, encode_pairs, make_preview
from .loop import LoopConfig, check_fresh, fit, make_accelerator


def folder_data(bundle, folder: Path, cache: Path | None, write: bool = True) -> tuple[LCDData, LoadReport, list[str]]:
    """Encode a user folder once (latents and caption states; reused while the folder is unchanged).
    Returns the data, the load report and the captions."""
    resolution = bundle.unet.config.sample_size * bundle.vae_factor
    pairs, report = load_pairs(folder, resolution)
    if not pairs:
        raise ValueError(f"no usable image-caption pairs in {folder}: {report.summary()}")
    digest = hashlib.sha256()
    for image, text in pairs:
        digest.update(image.tobytes())
        digest.update(text.encode())
    meta = {"folder": str(folder), "pairs": digest.hexdigest()[:16], "model": str(bundle.path)}
    found = LCDData.load(cache, meta) if cache is not None else None
    if found is None:
        found = encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, pairs, **bundle_text_fns(bundle))
        if cache is not None and write:
            found.save(cache, meta)
    return found, report, [text for _, text in pairs]


def folder_latents_and_captions(bundle, folder: Path):
    """(latents [N, C, h, w], captions, report) of a user folder, for plain diffusion training."""
    data, report, captions = folder_data(bundle, folder, None)
    return data.latents, captions, report


def _require_lcm(bundle):
    from ..models.bundle import ModelError

    if not bundle.is_lcm:
        raise ModelError(f"{bundle.path} is a diffusion teacher; LCF fine-tunes an LCM (distil one with `lcm distill`)")
    return bundle


def default_skip(bundle) -> int:
    """The LCM's own skipping interval: T // original_inference_steps."""
    _require_lcm(bundle)
    return bundle.scheduler_config.get("num_train_timesteps", 1000) // bundle.original_inference_steps


def finetune(model_dir: str | Path, data_dir: str | Path, out: str | Path, cfg: LCDConfig, loop_cfg: LoopConfig, *,
             resume: bool = False, command: str = "", accelerator=None) -> tuple[int, Path | None, LoadReport]:
    """LCF of the LCM in ``model_dir`` on ``data_dir``; exports an LCM folder into ``out`` when finished.

    Returns:
        (steps done, ``out`` once finished or None when a time limit stopped it, the data load report).
    """
    from ..models.bundle import Bundle
    from .export import export_lcm

    if cfg.target != "same-noise":
        raise ValueError("finetune runs LCF: LCDConfig(target='same-noise')")
    acc = accelerator if accelerator is not None else make_accelerator()
    out, t0 = Path(out), time.time()
    check_fresh(out, resume)
    bundle = _require_lcm(Bundle.load(model_dir))
    out.mkdir(parents=True, exist_ok=True)
    data, report, captions = folder_data(bundle, Path(data_dir), out / "data-cache.safetensors",
                                         write=acc.is_main_process)
    student = bundle.unet.train().requires_grad_(True)
    task = LCDTask(None, bundle.scheduler_config, data, cfg, student=student,
                   preview_fn=make_preview(bundle, bundle.original_inference_steps, prompts=captions))
    done = fit(task, loop_cfg, out, resume, desc="finetune", accelerator=acc)
    if done < loop_cfg.max_steps:
        return done, None, report
    if acc.is_main_process:
        lcd = {**asdict(cfg), "solver": "none (LCF: same-noise target, no teacher)"}
        info = {"command": command, "teacher": str(model_dir), "steps": done, "lcd": lcd, "data": str(data_dir),
                "data_report": report.summary(),
                "loop": {k: v for k, v in asdict(loop_cfg).items() if k != "extra_meta"},
                "minutes_this_session": round((time.time() - t0) / 60, 2), "processes": acc.num_processes,
                "title": f"Latent Consistency Model fine-tuned from `{model_dir}`",
                "intro": (f"Latent Consistency Fine-tuning (LCF; Luo et al. 2023, Sec. 4.4) of the LCM `{model_dir}` "
                          f"on the image folder `{data_dir}` ({report.summary()}), made with latentcm: no teacher, "
                          "both consistency points from the same latent and noise.")}
        export_lcm(task.student_unet, bundle, out, info, skip=cfg.skip)
    acc.wait_for_everyone()
    return done, out, report
