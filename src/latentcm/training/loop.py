"""One training loop for every stage: the variant is a :class:`Task`, not a copied script.

``train_step`` holds the update; ``fit`` holds the I/O: cadence, progress bar, metrics
CSV, preview grids, atomic checkpoints and resume. Batches are a pure function of
``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.

Faults: a step whose loss or gradient is not finite is skipped (no update, no EMA; ``skipped`` in
metrics.csv) and ``LoopConfig.max_bad_steps`` of them in a row stop the run with a checkpoint of the
last good weights and :class:`NonFiniteLossError`. Resume continues from the newest *readable*
checkpoint (an unreadable one is moved aside as ``*.unreadable`` with a warning), removes temp files
of interrupted writes and cuts metrics.csv back to the checkpoint's step, so every step has one row.

Both run through ``accelerate.Accelerator``: a single process by default, and unchanged under
``accelerate launch`` with several processes (data parallel: process r of W draws batch index
``step * W + r``; gradients are averaged; only the main process writes files).

Memory and precision (``LoopConfig``): ``mixed_precision`` bf16 / fp16 runs the task's loss under
``torch.autocast`` (the student keeps fp32 master weights; a task with ``set_precision`` stores its frozen
networks in half; fp16 scales the loss with a GradScaler), also when ``accelerate launch --mixed_precision``
set it. ``gradient_accumulation`` N: micro-batch j of optimizer step s is batch index ``s * N + j`` (times W
processes, plus r), so batches stay a pure function of the step and resume stays exact. ``optimizer``
adamw | adamw8bit (bitsandbytes).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import (CheckpointReadError, clean_temp_files, list_checkpoints, load_checkpoint,
                         prune_checkpoints, save_checkpoint)

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """Too many updates in a row had a non-finite loss or gradient; the last good state was checkpointed."""


class Task(Protocol):
    """What a stage supplies to the loop.

    Optional: ``prepare(accelerator)`` -- move the task's modules and cached tensors to
    ``accelerator.device`` and route the trainable forward through ``accelerator.prepare`` (DDP with
    several processes), keeping ``modules()`` the unwrapped ones. A task without it stays where it is,
    and with several processes the loop averages its gradients itself. ``param_groups()`` -- the
    optimizer's groups, each optional ``lr_scale`` multiplying the scheduled lr; without it one group.
    """

    def modules(self) -> dict[str, torch.nn.Module]: ...          # everything checkpointed
    def parameters(self) -> list[torch.nn.Parameter]: ...         # what the optimizer trains
    def batch(self, step: int) -> dict: ...                        # deterministic in its index
    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]: ...
    def after_update(self, step: int) -> None: ...                 # e.g. EMA
    def preview(self, step: int, out_dir: Path) -> None: ...       # sample grid


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of batch ``step`` of a run seeded ``seed``: batches are a pure function of both."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta (LCM Algorithm 1 line 8), over the parameters that
    train (a frozen base under a LoRA adapter is equal in both and is skipped)."""
    with torch.no_grad():
        for pt, po in zip(target.parameters(), online.parameters()):
            if po.requires_grad:
                if pt.dtype == po.dtype:
                    pt.lerp_(po, 1 - decay)
                else:  # a half-precision target of an fp32 student: mix in fp32, store rounded
                    pt.copy_(pt.float().lerp_(po.float(), 1 - decay))


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
    max_bad_steps: int = 10  # stop after this many skipped (non-finite loss / gradient) updates in a row; 0: never
    betas: tuple[float, float] = (0.9, 0.999)
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; "no" defers to what accelerate launch set)
    gradient_accumulation: int = 1  # micro-batches per optimizer step (batch index s * N + j)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    extra_meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.gradient_accumulation < 1:
            raise ValueError(f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


PRECISIONS = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(task: Task, cfg: LoopConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AdamW over ``task.param_groups()`` when the task has it (a group's ``lr_scale`` multiplies the lr), else
    over ``task.parameters()``."""
    params = task.param_groups() if hasattr(task, "param_groups") else task.parameters()
    if cfg.optimizer == "adamw8bit":
        return _adamw8bit(params, cfg, device)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _adamw8bit(params, cfg: LoopConfig, device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW, or a one-line ValueError saying why it cannot be used here."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # not installed, or its native library does not load
        raise ValueError(f"--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    params = list(params)
    where = torch.device(device if device is not None else (params[0].device if params else "cpu"))
    if where.type != "cuda":  # bitsandbytes' CPU support depends on its version and build: probe it once
        try:
            probe = torch.nn.Parameter(torch.zeros(4096, device=where))
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        except Exception as exc:
            raise ValueError(f"--optimizer adamw8bit: bitsandbytes' 8-bit AdamW does not run on {where.type} here "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             f"use a CUDA GPU or --optimizer adamw") from None
    return _flat_state(bnb.optim.AdamW8bit)(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _flat_state(cls):
    """``cls`` with a flat state dict (bitsandbytes nests its quantisation state one dict deep; checkpoints hold
    one tensor per (parameter, key)), restored on load."""
    class Flat(cls):
        def state_dict(self):
            sd = super().state_dict()
            state = {pid: {f"{k}/{kk}" if isinstance(v, dict) else k: vv
                           for k, v in st.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
                     for pid, st in sd["state"].items()}
            return {**sd, "state": state}

        def load_state_dict(self, state_dict):
            state = {}
            for pid, st in state_dict["state"].items():
                nested: dict = {}
                for k, v in st.items():
                    if "/" in k:
                        outer, inner = k.split("/", 1)
                        nested.setdefault(outer, {})[inner] = v
                    else:
                        nested[k] = int(v) if k == "step" and torch.is_tensor(v) else v
                state[pid] = nested
            super().load_state_dict({**state_dict, "state": state})
    Flat.__name__ = Flat.__qualname__ = cls.__name__
    return Flat


def precision_of(cfg: LoopConfig, accelerator) -> str:
    """The run's precision: the config's, else what ``accelerate launch --mixed_precision`` set."""
    if cfg.mixed_precision != "no":
        return cfg.mixed_precision
    mp = str(getattr(accelerator, "mixed_precision", "no") or "no")
    return mp if mp in HALF else "no"


def make_accelerator():
    """The default accelerator: one process on the best local device, or what ``accelerate launch`` set up."""
    from accelerate import Accelerator

    return Accelerator()


def prepare(task: Task, cfg: LoopConfig, accelerator) -> torch.optim.Optimizer:
    """Let the task place (and wrap) its modules, then build and prepare the optimizer."""
    own = hasattr(task, "prepare")
    precision = precision_of(cfg, accelerator)
    if precision != "no" and hasattr(task, "set_precision"):
        task.set_precision(HALF[precision])  # frozen networks stored in half; the trained weights stay fp32
    if own:
        task.prepare(accelerator)
    opt = make_optimizer(task, cfg, accelerator.device if own else None)
    # A task that placed nothing keeps its optimizer state where its parameters are.
    opt = accelerator.prepare(opt) if own else accelerator.prepare(opt, device_placement=[False])
    if precision == "fp16" and getattr(accelerator, "scaler", None) is None:
        opt.lcm_scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=2.0 ** 10)  # fp16: loss scaling
    return opt


def _autocast(cfg: LoopConfig, accelerator):
    precision = precision_of(cfg, accelerator)
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(accelerator.device.type, dtype=HALF[precision])


def _average_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Data-parallel gradient mean for tasks whose modules are not DDP-wrapped."""
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, "mean")


def train_step(task: Task, opt: torch.optim.Optimizer, cfg: LoopConfig, step: int, accelerator=None) -> dict:
    """One optimizer update at ``step``; returns the step's metrics. No I/O."""
    acc = accelerator if accelerator is not None else make_accelerator()
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
    n, scaler = cfg.gradient_accumulation, getattr(opt, "lcm_scaler", None)
    opt.zero_grad(set_to_none=True)
    total, metrics = None, {}
    for j in range(n):  # micro-batch j of step s is batch index s * N + j (per process: times W, plus r)
        with _autocast(cfg, acc):
            loss, metrics = task.loss(task.batch((step * n + j) * acc.num_processes + acc.process_index), step)
        part = loss / n if n > 1 else loss
        if scaler is not None:
            scaler.scale(part).backward()
        else:
            acc.backward(part)
        total = part.detach().float() if total is None else total + part.detach().float()
    loss = total
    if acc.num_processes > 1 and not hasattr(task, "prepare"):
        _average_gradients(task.parameters(), acc)
    if scaler is not None:
        scaler.unscale_(opt.optimizer if hasattr(opt, "optimizer") else opt)
    grad_norm = acc.clip_grad_norm_(task.parameters(), cfg.grad_clip)
    finite = bool(torch.isfinite(loss).all()) and math.isfinite(float(grad_norm))
    bad = _any_process(acc, not finite)  # every process skips together
    if scaler is not None and bad:
        scaler.update()  # an fp16 overflow shrinks the loss scale; the step is skipped below
    if bad:  # no update and no EMA from a NaN / Inf loss or gradient
        opt.zero_grad(set_to_none=True)
    else:
        if scaler is not None:
            scaler.step(opt.optimizer if hasattr(opt, "optimizer") else opt)
            scaler.update()
        else:
            opt.step()
        task.after_update(step)
    loss = loss if acc.num_processes == 1 else acc.reduce(loss, "mean")
    return {"loss": float(loss), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"], **metrics,
            "skipped": int(bad)}


def _resume(task: Task, opt: torch.optim.Optimizer, ckpt_dir: Path, main: bool = True) -> dict:
    """Load the newest readable checkpoint in ``ckpt_dir`` and return its metadata ({"step": 0} when there is
    none). Unreadable newer ones are skipped with a warning and (main process) renamed ``*.unreadable``;
    CheckpointReadError when checkpoints exist but none is readable."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        return {"step": 0}
    bad: list[tuple[Path, CheckpointReadError]] = []
    for path in reversed(found):
        try:
            meta = load_checkpoint(path, task.modules(), opt)
        except CheckpointReadError as exc:
            bad.append((path, exc))
            continue
        for old, exc in bad:
            log.warning("warning: skipping %s: %s; resuming from %s", old.name, str(exc).splitlines()[0], path.name)
            if main:
                try:
                    old.replace(old.with_name(old.name + ".unreadable"))
                except OSError:
                    pass
        return meta
    raise CheckpointReadError(f"no readable checkpoint in {ckpt_dir} ({len(bad)} found, e.g. {bad[0][1]})")


def truncate_metrics(path: str | Path, step: int) -> int:
    """Cut ``metrics.csv`` back to the rows of steps 1..``step`` (one each, the last written; a partial last
    line of a killed run is dropped), so a resumed run logs every step once. Returns the rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").split("\n")
    header, body, partial = lines[0], lines[1:-1], lines[-1]  # a kill mid-write leaves a partial last line
    rows: dict[int, str] = {}
    for line in body:
        try:
            at = int(line.split(",", 1)[0])
        except ValueError:
            continue
        if 1 <= at <= step:
            rows[at] = line
    dropped = len(body) + (bool(partial) and len(lines) > 1) - len(rows)
    if len(lines) == 1:  # not even a complete header
        rows = {}
    if not rows:
        path.unlink()
        return dropped
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join([header, *(rows[k] for k in sorted(rows))]) + "\n")
        tmp.replace(path)
    return dropped


def _log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def training_minutes(out_dir: str | Path) -> float:
    """Wall minutes of a run's optimizer steps: time_s of the last row of OUT/metrics.csv (carried over resumes)."""
    with open(Path(out_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{out_dir}/metrics.csv has no rows")
    return round(float(rows[-1]["time_s"]) / 60, 2)


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any one (so all processes stop together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _save(task: Task, opt, accelerator, ckpt_dir: Path, keep: int, meta: dict) -> None:
    """Checkpoint the unwrapped modules + optimizer, on the main process only."""
    if accelerator.is_main_process:
        modules = {k: accelerator.unwrap_model(m) for k, m in task.modules().items()}
        save_checkpoint(ckpt_dir / f"step-{meta['step']:07d}.safetensors", modules, opt, meta)
        prune_checkpoints(ckpt_dir, keep)
    accelerator.wait_for_everyone()


def check_fresh(out_dir: str | Path, resume: bool) -> None:
    """Refuse to start over a run that already has checkpoints unless resuming."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --resume or use a new --out")


def fit(task: Task, cfg: LoopConfig, out_dir: str | Path, resume: bool = False, desc: str = "train",
        on_checkpoint: Callable[[int], None] | None = None, accelerator=None) -> int:
    """Train ``task`` to ``cfg.max_steps`` (or the time limit); returns the last step done."""
    acc = accelerator if accelerator is not None else make_accelerator()
    out, main = Path(out_dir), acc.is_main_process
    ckpt_dir = out / "checkpoints"
    check_fresh(out, resume)
    if main:
        for orphan in clean_temp_files(ckpt_dir):
            log.info("removed %s (an interrupted checkpoint write)", orphan)
        (out / "metrics.csv.tmp").unlink(missing_ok=True)  # of an interrupted truncate_metrics
    out.mkdir(parents=True, exist_ok=True)
    opt = prepare(task, cfg, acc)
    meta = _resume(task, opt, ckpt_dir, main) if resume else {"step": 0}
    if int(meta.get("gradient_accumulation", cfg.gradient_accumulation)) != cfg.gradient_accumulation:
        raise ValueError(f"the checkpoint was trained with --gradient-accumulation {meta['gradient_accumulation']}; "
                         f"resume with the same value (got {cfg.gradient_accumulation})")
    step, spent = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
    skipped_total = int(meta.get("skipped_steps", 0))
    bad_run = 0 if meta.get("stopped") == "non-finite" else int(meta.get("bad_in_a_row", 0))
    if main:
        truncate_metrics(out / "metrics.csv", step)  # rows of steps after the checkpoint are replayed
    start, t0 = step, time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, dynamic_ncols=True, disable=not main)

    def save(at: int, **extra) -> None:
        _save(task, opt, acc, ckpt_dir, cfg.keep_checkpoints,
              {"step": at, "elapsed_s": spent + time.time() - t0, "skipped_steps": skipped_total,
               "bad_in_a_row": bad_run, "gradient_accumulation": cfg.gradient_accumulation, **extra,
               **cfg.extra_meta})
        if on_checkpoint and main:
            on_checkpoint(at)

    try:
        while step < cfg.max_steps:
            metrics = train_step(task, opt, cfg, step, acc)
            step += 1
            bad_run = bad_run + 1 if metrics["skipped"] else 0
            skipped_total += metrics["skipped"]
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", **({"skipped": skipped_total} if skipped_total else {}))
            if main:
                _log_row(out / "metrics.csv", {"step": step, "time_s": round(spent + time.time() - t0, 2), **metrics,
                                               "skipped_total": skipped_total})
            diverged = bool(cfg.max_bad_steps) and bad_run >= cfg.max_bad_steps
            if diverged:
                save(step, stopped="non-finite")
                raise NonFiniteLossError(
                    f"training stopped at step {step}: {bad_run} updates in a row had a non-finite loss or gradient "
                    f"and were skipped ({skipped_total} in all); the last good weights are in "
                    f"{ckpt_dir / f'step-{step:07d}.safetensors'}; lower the learning rate or check the data")
            timed_out = _any_process(acc, cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or timed_out:
                save(step)
            if main and cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.max_steps):
                with _autocast(cfg, acc):  # a half-stored network (LoRA's base UNet) samples under autocast
                    task.preview(step, out / "previews")
            if timed_out:
                break
    finally:
        bar.close()
    if step == start and step < cfg.max_steps:
        save(step)
    return step
