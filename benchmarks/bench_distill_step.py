"""Distillation cost, from one run: seconds per optimizer step and trainable parameters of LCD's variants on the
same teacher, batch and data, each as a speed-up over the diffusers-faithful step (the teacher's conditional and
unconditional passes as two forwards, as diffusers' train_lcm_distill_sd_wds.py runs them):

    diffusers-faithful   full UNet, cond and uncond teacher passes apart
    batched (ours)       full UNet, cond and uncond in one batched teacher forward
    one-pass guided      full UNet, a guidance-distilled teacher (lcm distill --stage guidance): one pass, w an input
    real-CFG mode        full UNet, the unguided ODE (w = 0): the conditional pass alone
    LCM-LoRA             only a rank-r adapter trains; batched teacher passes
    no teacher (bound)   full UNet, LCF's same-noise target (no teacher pass at all): what any teacher-side
                         saving can at most reach, since every LCD step still pays the student and target

Each row times ``train_step`` (batch, teacher solver step, student and target forwards, backward, AdamW, EMA);
rows run interleaved, --repeats rounds of --steps after --warmup untimed steps; the median per row is kept.

    python benchmarks/bench_distill_step.py                         # the shipped teacher, batch 16, r = 16
    python benchmarks/bench_distill_step.py --teacher /path/to/sd15 --device cuda --rank 64 --batch-size 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.data.shapes import world_data
from latentcm.training.loop import LoopConfig, make_accelerator, prepare, train_step
from latentcm.defaults import LORA_OMEGA
from latentcm.models.lora import LoRAConfig
from latentcm.training.consistency import LoRATask
from latentcm.models.denoiser import make_student
from latentcm.solvers import augmented_step
from latentcm.training.recipes import lcd_config


class SeparatePassesTask(LCDTask):
    """LCD with the teacher's cond and uncond passes as two forwards per solver stage (diffusers' script form)."""

    @torch.no_grad()
    def solver_target(self, z_s, t_start, t_end, text, omega):
        uncond = self.data.uncond_states.expand_as(text)
        return augmented_step(self.solver, z_s, t_start, t_end, lambda x, t: self.teacher(x, t, text),
                              lambda x, t: self.teacher(x, t, uncond), omega, alpha_bar=self.alpha_bar)


KINDS = ("diffusers-faithful", "batched (ours)", "one-pass guided", "real-CFG mode", "LCM-LoRA", "no teacher (bound)")


def make_task(kind: str, teacher: str, data, batch_size: int, rank: int):
    bundle = Bundle.load(registry.resolve(teacher))
    cfg = LCDConfig(batch_size=batch_size, loss="huber")
    if kind == "diffusers-faithful":
        return SeparatePassesTask(bundle.unet, bundle.scheduler_config, data, cfg)
    if kind == "batched (ours)":
        return LCDTask(bundle.unet, bundle.scheduler_config, data, cfg)
    if kind == "one-pass guided":  # the cost of a guidance-distilled teacher does not depend on its weights
        return LCDTask(bundle.unet, bundle.scheduler_config, data, cfg, guided_teacher=make_student(bundle.unet))
    if kind == "real-CFG mode":
        return LCDTask(bundle.unet, bundle.scheduler_config, data, lcd_config("distill", guidance_mode="cfg",
                                                                              batch_size=batch_size, loss="huber"))
    if kind == "no teacher (bound)":  # LCF's step: student and target forwards, no teacher
        return LCDTask(None, bundle.scheduler_config, data, LCDConfig(batch_size=batch_size, loss="huber",
                                                                      target="same-noise"),
                       student=make_student(bundle.unet).train().requires_grad_(True))
    cfg = LCDConfig(batch_size=batch_size, loss="huber", omega_min=LORA_OMEGA, omega_max=LORA_OMEGA, ema_decay=0.0)
    return LoRATask(bundle.unet, bundle.scheduler_config, data, cfg, LoRAConfig(rank=rank))


class Stepper:
    """One task with its optimizer, timed a block of steps at a time."""

    def __init__(self, task):
        self.task, self.acc = task, make_accelerator()
        self.cfg = LoopConfig(max_steps=10**6, lr=1e-4, warmup=0, schedule="constant")
        self.opt, self.step = prepare(task, self.cfg, self.acc), 0

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(self.task, self.opt, self.cfg, self.step, self.acc)
            self.step += 1
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="teacher", help="Shipped teacher name or teacher folder.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the LCM-LoRA row.")
    ap.add_argument("--steps", type=int, default=10, help="Timed steps per block.")
    ap.add_argument("--repeats", type=int, default=5, help="Interleaved timed rounds (the median is kept).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-data", type=int, default=256, help="World images encoded for the batches.")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, and return its rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = world_data(Bundle.load(registry.resolve(args.teacher)), args.num_data)
    steppers = {kind: Stepper(make_task(kind, args.teacher, data, args.batch_size, args.rank)) for kind in KINDS}
    for stepper in steppers.values():
        stepper.run(args.warmup)
    times = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):  # interleaved rounds: a load change hits every row alike
        for kind, stepper in steppers.items():
            times[kind].append(stepper.run(args.steps))
    base = statistics.median(times[KINDS[0]])
    rows = []
    print(f"| LCD step | trainable parameters | s/step (batch {args.batch_size}, median) | speed-up vs "
          "diffusers-faithful (median, range over rounds) |")
    print("|---|---|---|---|")
    for kind in KINDS:
        med = statistics.median(times[kind])
        ratios = [b / t for b, t in zip(times[KINDS[0]], times[kind])]
        trainable = sum(p.numel() for p in steppers[kind].task.parameters())
        rows.append({"row": kind, "trainable": trainable, "s_per_step": med, "speedup": base / med})
        print(f"| {kind} | {trainable:,} | {med:.3f} | {base / med:.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |")
    return rows


if __name__ == "__main__":
    main()
