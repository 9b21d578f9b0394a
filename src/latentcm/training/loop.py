"""One training loop for every stage: the variant is a :class:`Task`, not a copied script.

``train_step`` holds the update; ``fit`` holds the I/O: cadence, progress bar, metrics
CSV, preview grids, atomic checkpoints and resume. Batches are a pure function of
``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint


class Task(Protocol):
    """What a stage supplies to the loop."""

    def modules(self) -> dict[str, torch.nn.Module]: ...          # everything checkpointed
    def parameters(self) -> list[torch.nn.Parameter]: ...         # what the optimizer trains
    def batch(self, step: int) -> dict: ...                        # deterministic in step
    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]: ...
    def after_update(self, step: int) -> None: ...                 # e.g. EMA
    def preview(self, step: int, out_dir: Path) -> None: ...       # sample grid


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    preview_every: int = 0
    max_minutes: float | None = None  # stop cleanly (with a checkpoint) after this long
    betas: tuple[float, float] = (0.9, 0.999)
    extra_meta: dict = field(default_factory=dict)


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(task: Task, cfg: LoopConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(task.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train_step(task: Task, opt: torch.optim.Optimizer, cfg: LoopConfig, step: int) -> dict:
    """One optimizer update at ``step``; returns the step's metrics. No I/O."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss, metrics = task.loss(task.batch(step), step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
    opt.step()
    task.after_update(step)
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
            **metrics}


def resume_state(task: Task, opt: torch.optim.Optimizer, ckpt_dir: Path) -> tuple[int, float]:
    """Load the newest checkpoint in ``ckpt_dir``; return (step to continue from, seconds spent)."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        return 0, 0.0
    meta = load_checkpoint(found[-1], task.modules(), opt)
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def _log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def fit(task: Task, cfg: LoopConfig, out_dir: str | Path, resume: bool = False,
        desc: str = "train", on_checkpoint: Callable[[int], None] | None = None) -> int:
    """Train ``task`` to ``cfg.max_steps`` (or the time limit); returns the last step done."""
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    opt = make_optimizer(task, cfg)
    if not resume and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --resume or use a new --out")
    step, spent = resume_state(task, opt, ckpt_dir) if resume else (0, 0.0)
    start, t0 = step, time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, dynamic_ncols=True)

    def save(at: int) -> None:
        save_checkpoint(ckpt_dir / f"step-{at:07d}.safetensors", task.modules(), opt,
                        {"step": at, "elapsed_s": spent + time.time() - t0, **cfg.extra_meta})
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        if on_checkpoint:
            on_checkpoint(at)

    while step < cfg.max_steps:
        metrics = train_step(task, opt, cfg, step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        _log_row(out / "metrics.csv", {"step": step, "time_s": round(spent + time.time() - t0, 2), **metrics})
        timed_out = cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or timed_out:
            save(step)
        if cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.max_steps):
            task.preview(step, out / "previews")
        if timed_out:
            break
    bar.close()
    if step == start and step < cfg.max_steps:
        save(step)
    return step
