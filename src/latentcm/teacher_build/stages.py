"""Build the offline default teacher, stage by stage, resumably.

Layout of a build folder ``OUT``::

    OUT/vae/     checkpoints/, metrics.csv, previews/, final/ (AutoencoderKL)
    OUT/clip/    checkpoints/, metrics.csv, final/text_encoder, final/tokenizer
    OUT/judge/   checkpoints/, metrics.csv, final/ (judge.safetensors + config.json)
    OUT/unet/    checkpoints/, metrics.csv, previews/, final/ (EMA UNet2DConditionModel)
    OUT/teacher/ the assembled diffusers StableDiffusionPipeline folder
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import world
from ..bundle import Bundle
from ..defaults import COMPARE_TEACHER_STEPS, TEACHER_GUIDANCE, TEACHER_SAMPLER
from ..images import save_grid
from ..models import components
from ..models.judge import Judge
from ..training.data.shapes import WorldData
from ..training.diffusion import UNetTask
from ..training.loop import LoopConfig, fit
from . import tasks as T

STAGES = ("vae", "clip", "judge", "unet")


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    data_count: int
    warmup: int = 100


# Budgets measured on the 2-core CPU machine (see the model card for wall times).
DEFAULT_STAGES = {
    "vae": StageConfig(steps=2000, batch_size=32, lr=1e-3, data_count=20000),
    "clip": StageConfig(steps=3000, batch_size=128, lr=1e-3, data_count=20000),
    "judge": StageConfig(steps=1500, batch_size=64, lr=2e-3, data_count=20000),
    "unet": StageConfig(steps=7000, batch_size=32, lr=1e-3, data_count=30000, warmup=200),
}
MICRO_STAGES = {k: replace(v, steps=3, batch_size=4, data_count=16, warmup=1) for k, v in DEFAULT_STAGES.items()}

# Seeds: the world draws training images with WORLD_SEED; each stage offsets the seed.
WORLD_SEED = 1234


def stage_configs(preset: str) -> dict[str, StageConfig]:
    return MICRO_STAGES if preset == "micro" else DEFAULT_STAGES


def _loop_cfg(sc: StageConfig, steps: int | None, minutes: float | None, preview_every: int,
              checkpoint_every: int) -> LoopConfig:
    return LoopConfig(max_steps=steps or sc.steps, lr=sc.lr, warmup=sc.warmup, max_minutes=minutes,
                      preview_every=preview_every, checkpoint_every=checkpoint_every)


def _done(folder: Path) -> bool:
    return (folder / "final" / "DONE").is_file()


def _mark_done(folder: Path, info: dict) -> None:
    (folder / "final" / "DONE").write_text(json.dumps(info, indent=2) + "\n")


def _require(out: Path, stage: str) -> Path:
    final = out / stage / "final"
    if not _done(out / stage):
        raise FileNotFoundError(f"stage '{stage}' has not finished in {out}; run `lcm train-teacher {stage}` first")
    return final


def run_vae(out: Path, preset: str, seed: int, resume: bool, steps=None, minutes=None) -> bool:
    p, sc = components.get_preset(preset), stage_configs(preset)["vae"]
    vae = components.build_vae(p, seed)
    data = WorldData.make(WORLD_SEED, sc.data_count)
    cfg = _loop_cfg(sc, steps, minutes, preview_every=200, checkpoint_every=100)
    task = T.VAETask(vae, data, seed, sc.batch_size, cfg.max_steps)
    done = fit(task, cfg, out / "vae", resume, desc="vae")
    if done < cfg.max_steps:
        return False
    vae.eval()
    vae.register_to_config(scaling_factor=T.measure_scaling_factor(vae, data, min(2048, sc.data_count)))
    vae.save_pretrained(out / "vae" / "final")
    _mark_done(out / "vae", {"steps": done, "scaling_factor": vae.config.scaling_factor})
    return True


def run_clip(out: Path, preset: str, seed: int, resume: bool, steps=None, minutes=None) -> bool:
    p, sc = components.get_preset(preset), stage_configs(preset)["clip"]
    clip, tok = components.build_text_and_vision(p, seed)
    data = WorldData.make(WORLD_SEED + 1, sc.data_count)
    cfg = _loop_cfg(sc, steps, minutes, preview_every=0, checkpoint_every=200)
    done = fit(T.CLIPTask(clip, tok, data, seed, sc.batch_size), cfg, out / "clip", resume, desc="clip")
    if done < cfg.max_steps:
        return False
    components.text_encoder_from_clip(clip).save_pretrained(out / "clip" / "final" / "text_encoder")
    tok.save_pretrained(out / "clip" / "final" / "tokenizer")
    _mark_done(out / "clip", {"steps": done})
    return True


def run_judge(out: Path, preset: str, seed: int, resume: bool, steps=None, minutes=None) -> bool:
    p, sc = components.get_preset(preset), stage_configs(preset)["judge"]
    torch.manual_seed(seed)
    judge = Judge(p.judge_width)
    data = WorldData.make(WORLD_SEED + 2, sc.data_count)
    cfg = _loop_cfg(sc, steps, minutes, preview_every=0, checkpoint_every=200)
    done = fit(T.JudgeTask(judge, data, seed, sc.batch_size), cfg, out / "judge", resume, desc="judge")
    if done < cfg.max_steps:
        return False
    judge.eval().save(out / "judge" / "final")
    _mark_done(out / "judge", {"steps": done})
    return True


def encode_latents(vae, data: WorldData) -> torch.Tensor:
    """Posterior-mode latents times the VAE scaling factor, [N, 4, h, w]."""
    return T.encode_mode(vae, data) * vae.config.scaling_factor


def _unet_preview(vae, text_encoder, tok, sched_cfg):
    prompts = [s.text for s in world.iter_samples(7, 8, "heldout")]

    def preview(ema, step, out_dir):
        bundle = Bundle(ema, vae, text_encoder, tok, sched_cfg)
        imgs = bundle.generate(prompts, list(range(8)), TEACHER_SAMPLER, COMPARE_TEACHER_STEPS, TEACHER_GUIDANCE)
        save_grid(imgs, out_dir / f"unet-{step:07d}.png")
    return preview


def run_unet(out: Path, preset: str, seed: int, resume: bool, steps=None, minutes=None) -> bool:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    p, sc = components.get_preset(preset), stage_configs(preset)["unet"]
    vae = AutoencoderKL.from_pretrained(_require(out, "vae")).eval()
    clip_dir = _require(out, "clip")
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    data = WorldData.make(WORLD_SEED + 3, sc.data_count)
    latents = encode_latents(vae, data)
    unet = components.build_unet(p, seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    preview = _unet_preview(vae, text_encoder, tok, components.noise_scheduler_config())
    task = UNetTask(unet, ema, text_encoder, tok, latents, data.scenes, seed, sc.batch_size,
                    scheduler_config=components.noise_scheduler_config(),
                    preview_fn=preview if preset != "micro" else None)
    cfg = _loop_cfg(sc, steps, minutes, preview_every=500 if preset != "micro" else 0, checkpoint_every=100)
    done = fit(task, cfg, out / "unet", resume, desc="unet")
    if done < cfg.max_steps:
        return False
    ema.save_pretrained(out / "unet" / "final")
    _mark_done(out / "unet", {"steps": done})
    return True


RUNNERS = {"vae": run_vae, "clip": run_clip, "judge": run_judge, "unet": run_unet}


def export_teacher(out: Path, dest: Path | None = None) -> Path:
    """Assemble the stages into a folder StableDiffusionPipeline loads with no code of ours."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    clip_dir = _require(out, "clip")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(_require(out, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(clip_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(_require(out, "unet")),
        scheduler=DDIMScheduler(**components.noise_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dest = dest or out / "teacher"
    pipe.save_pretrained(dest, safe_serialization=True)
    # The UNet is stored in fp16 to halve the shipped size; diffusers loads it back as fp32.
    pipe.unet.half().save_pretrained(dest / "unet", safe_serialization=True)
    return dest


def _wall_minutes(rows: list[dict]) -> float:
    """Training wall time from a metrics log; a resumed segment restarts or continues its clock."""
    total, prev = 0.0, 0.0
    for row in rows:
        t = float(row["time_s"])
        total += t - prev if t >= prev else t
        prev = t
    return total / 60


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def build_info(out: Path) -> dict:
    """Steps and wall time per stage, read from the metrics logs (for the model card)."""
    import csv

    info = {"machine": _cpu_name(), "cpu_cores": os.cpu_count(), "stages": {}}
    for stage in STAGES:
        log = out / stage / "metrics.csv"
        if log.is_file():
            rows = list(csv.DictReader(open(log)))
            info["stages"][stage] = {"steps": int(rows[-1]["step"]), "last_loss": float(rows[-1]["loss"]),
                                     "minutes": _wall_minutes(rows),
                                     "config": asdict(DEFAULT_STAGES[stage])}
    return info


def run_stages(out: Path, stages: list[str], preset: str, seed: int, resume: bool,
               steps: int | None = None, minutes: float | None = None) -> bool:
    """Run stages in order, skipping finished ones; False if a time limit stopped one."""
    deadline = None if minutes is None else time.time() + 60 * minutes
    for stage in stages:
        if _done(out / stage):
            if not resume:
                raise FileExistsError(f"stage '{stage}' is already built in {out}; pass --resume or use a new --out")
            continue
        left = None if deadline is None else max(0.1, (deadline - time.time()) / 60)
        if not RUNNERS[stage](out, preset, seed, resume, steps, left):
            return False
    return True
