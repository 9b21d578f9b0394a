"""One training loop for every stage: the variant is a :class:`Task`, not a copied script.

``train_step`` holds the update; ``fit`` holds the I/O: cadence, progress bar, metrics
CSV, preview grids, atomic checkpoints and resume. Batches are a pure function of
``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.

Faults: a step whose loss or gradient is not finite is skipped (no update, no EMA; ``skipped`` in
metrics.csv) and ``LoopConfig.max_bad_steps`` of them in a row stop the run with a checkpoint of the
last good weights and :class:`NonFiniteLossError`. Resume continues from the newest *readable*
checkpoint (an unreadable one is moved aside as ``*.unreadable`` with a warning), removes temp files
of interrupted writes and cuts metrics.csv back to the checkpoint's step, so every step has one row.
Ctrl-C (SIGINT) checkpoints the last finished step and raises :class:`TrainingInterrupted`, whose message
says where it stopped; an update in progress is finished (and counted) first, so no checkpoint is half updated.

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
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints
from .optim8bit import adamw8bit
from .runs import (METRICS, check_fresh, clean_run_folder, log_row, resume_latest, save_step,  # noqa: F401
                   training_minutes, truncate_metrics)  # check_fresh, training_minutes: re-exported


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
    stop_at: int | None = None  # pause after this step (with a checkpoint; resume later); the lr schedule stays max_steps'
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
        return adamw8bit(params, cfg, device)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


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


class _UpdatedThenInterrupted(KeyboardInterrupt):
    """Ctrl-C that came during an update, raised once the update is whole; ``metrics`` are the finished step's."""

    def __init__(self, metrics: dict):
        super().__init__()
        self.metrics = metrics


@contextlib.contextmanager
def _holding_interrupt():
    """Hold Ctrl-C until the block is done (yields a list that is non-empty if one came): weights, optimizer
    state and EMA never stop half updated."""
    held: list = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield held
        return
    signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    held = []
    if bad:  # no update and no EMA from a NaN / Inf loss or gradient
        opt.zero_grad(set_to_none=True)
    else:
        with _holding_interrupt() as held:
            if scaler is not None:
                scaler.step(opt.optimizer if hasattr(opt, "optimizer") else opt)
                scaler.update()
            else:
                opt.step()
            task.after_update(step)
    loss = loss if acc.num_processes == 1 else acc.reduce(loss, "mean")
    metrics = {"loss": float(loss), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"], **metrics,
               "skipped": int(bad)}
    if held:
        raise _UpdatedThenInterrupted(metrics)
    return metrics


def _any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any one (so all processes stop together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C in ``fit``: the last finished step was checkpointed; the message says where and how to continue."""


@dataclass
class _Run:
    """The counters of a run in progress, carried over resumes in the checkpoint metadata."""

    step: int
    spent: float        # seconds of earlier sessions
    skipped_total: int  # skipped (non-finite) updates in all
    bad_run: int        # skipped updates in a row now
    t0: float = field(default_factory=time.time)

    @classmethod
    def from_meta(cls, meta: dict) -> "_Run":
        bad_run = 0 if meta.get("stopped") == "non-finite" else int(meta.get("bad_in_a_row", 0))
        return cls(int(meta["step"]), float(meta.get("elapsed_s", 0.0)), int(meta.get("skipped_steps", 0)), bad_run)

    def elapsed(self) -> float:
        return self.spent + time.time() - self.t0

    def meta(self, at: int, cfg: LoopConfig, **extra) -> dict:
        return {"step": at, "elapsed_s": self.elapsed(), "skipped_steps": self.skipped_total,
                "bad_in_a_row": self.bad_run, "gradient_accumulation": cfg.gradient_accumulation, **extra,
                **cfg.extra_meta}


def _start(task: Task, cfg: LoopConfig, out: Path, resume: bool, acc) -> tuple[torch.optim.Optimizer, _Run]:
    """Refuse to overwrite, clean what interrupted writes left, build the optimizer and resume the counters."""
    check_fresh(out, resume)
    if acc.is_main_process:
        clean_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    opt = prepare(task, cfg, acc)
    meta = resume_latest(task, opt, out / "checkpoints", acc.is_main_process) if resume else {"step": 0}
    if int(meta.get("gradient_accumulation", cfg.gradient_accumulation)) != cfg.gradient_accumulation:
        raise ValueError(f"the checkpoint was trained with --gradient-accumulation {meta['gradient_accumulation']}; "
                         f"resume with the same value (got {cfg.gradient_accumulation})")
    if acc.is_main_process:
        truncate_metrics(out / METRICS, int(meta["step"]))  # rows of steps after the checkpoint are replayed
    return opt, _Run.from_meta(meta)


def _record(run: _Run, metrics: dict, out: Path, main: bool, bar) -> None:
    """Count a finished step: skipped-update counters, progress bar, metrics.csv row."""
    run.step += 1
    run.bad_run = run.bad_run + 1 if metrics["skipped"] else 0
    run.skipped_total += metrics["skipped"]
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", **({"skipped": run.skipped_total} if run.skipped_total else {}))
    if main:
        log_row(out / METRICS, {"step": run.step, "time_s": round(run.elapsed(), 2), **metrics,
                                "skipped_total": run.skipped_total})


def fit(task: Task, cfg: LoopConfig, out_dir: str | Path, resume: bool = False, desc: str = "train",
        on_checkpoint: Callable[[int], None] | None = None, accelerator=None) -> int:
    """Train ``task`` to ``cfg.max_steps`` (or the time limit); returns the last step done."""
    acc = accelerator if accelerator is not None else make_accelerator()
    out, main = Path(out_dir), acc.is_main_process
    ckpt_dir = out / "checkpoints"
    opt, run = _start(task, cfg, out, resume, acc)
    start = run.step
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=desc, dynamic_ncols=True, disable=not main)

    def save(at: int, **extra) -> None:
        save_step(task, opt, acc, ckpt_dir, cfg.keep_checkpoints, run.meta(at, cfg, **extra))
        if on_checkpoint and main:
            on_checkpoint(at)

    try:
        _train(task, opt, cfg, run, out, acc, bar, save)
    except KeyboardInterrupt as exc:
        if isinstance(exc, _UpdatedThenInterrupted):  # the step's update was applied: it counts as finished
            _record(run, exc.metrics, out, main, bar)
        raise TrainingInterrupted(_interrupted(run.step, start, ckpt_dir, acc, save)) from None
    finally:
        bar.close()
    if run.step == start and run.step < _end(cfg):
        save(run.step)
    return run.step


def _end(cfg: LoopConfig) -> int:
    """The step this session trains to: ``max_steps``, or ``stop_at`` when that comes first."""
    return cfg.max_steps if cfg.stop_at is None else min(cfg.stop_at, cfg.max_steps)


def _interrupted(step: int, start: int, ckpt_dir: Path, acc, save) -> str:
    """Ctrl-C: checkpoint the last finished step (one process only: several may stop at different points)."""
    path = ckpt_dir / f"step-{step:07d}.safetensors"
    if step > start and acc.num_processes == 1 and not path.is_file():
        save(step, stopped="interrupted")
    if not path.is_file():
        found = list_checkpoints(ckpt_dir)
        if not found:
            return f"interrupted at step {step}; no checkpoint yet: rerunning the same command starts over"
        path = found[-1]
    return f"interrupted after step {step}; checkpoint {path}: rerun the same command with --resume to continue"


def _train(task: Task, opt, cfg: LoopConfig, run: _Run, out: Path, acc, bar, save) -> None:
    """The steps of ``fit``: update, record, checkpoint, preview, until max_steps, the time limit or a fault."""
    main, ckpt_dir, end = acc.is_main_process, out / "checkpoints", _end(cfg)
    while run.step < end:
        _record(run, train_step(task, opt, cfg, run.step, acc), out, main, bar)
        step = run.step
        if cfg.max_bad_steps and run.bad_run >= cfg.max_bad_steps:
            save(step, stopped="non-finite")
            raise NonFiniteLossError(
                f"training stopped at step {step}: {run.bad_run} updates in a row had a non-finite loss or "
                f"gradient and were skipped ({run.skipped_total} in all); the last good weights are in "
                f"{ckpt_dir / f'step-{step:07d}.safetensors'}; lower the learning rate or check the data")
        timed_out = _any_process(acc, cfg.max_minutes is not None and time.time() - run.t0 > 60 * cfg.max_minutes)
        if step % cfg.checkpoint_every == 0 or step == end or timed_out:
            save(step)
        if main and cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.max_steps):
            with _autocast(cfg, acc):  # a half-stored network (LoRA's base UNet) samples under autocast
                task.preview(step, out / "previews")
        if timed_out:
            break
