"""Distillation cost, from one run: seconds per optimizer step and trainable parameters of full LCD
(the whole UNet plus an EMA copy) against LCM-LoRA (one UNet, only the adapter trains), on the same
teacher, batch and data. Each row times ``train_step`` (batch, teacher solver step, student and target
forwards, backward, AdamW, EMA); best of --repeats blocks of --steps after --warmup untimed steps.
Ratios are against the full-UNet row of the same run.

    python benchmarks/bench_distill_step.py                         # the shipped teacher, batch 16, r = 16
    python benchmarks/bench_distill_step.py --teacher /path/to/sd15 --device cuda --rank 64 --batch-size 4
"""
from __future__ import annotations

import argparse
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


def make_task(kind: str, teacher: str, data, batch_size: int, rank: int):
    bundle = Bundle.load(registry.resolve(teacher))
    if kind == "full":
        return LCDTask(bundle.unet, bundle.scheduler_config, data, LCDConfig(batch_size=batch_size, loss="huber"))
    cfg = LCDConfig(batch_size=batch_size, loss="huber", omega_min=LORA_OMEGA, omega_max=LORA_OMEGA, ema_decay=0.0)
    return LoRATask(bundle.unet, bundle.scheduler_config, data, cfg, LoRAConfig(rank=rank))


def seconds_per_step(task, steps: int, repeats: int, warmup: int) -> float:
    acc, cfg = make_accelerator(), LoopConfig(max_steps=10**6, lr=1e-4, warmup=0, schedule="constant")
    opt = prepare(task, cfg, acc)
    step = 0
    for _ in range(warmup):
        train_step(task, opt, cfg, step, acc)
        step += 1
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(task, opt, cfg, step, acc)
            step += 1
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="teacher", help="Shipped teacher name or teacher folder.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the LCM-LoRA row.")
    ap.add_argument("--steps", type=int, default=10, help="Timed steps per block.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed blocks per row (best is kept).")
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
    rows = []
    for kind in ("full", "lora"):
        task = make_task(kind, args.teacher, data, args.batch_size, args.rank)
        trainable = sum(p.numel() for p in task.parameters())
        rows.append({"row": "full UNet (LCD)" if kind == "full" else f"LCM-LoRA r={args.rank}",
                     "trainable": trainable, "s_per_step": seconds_per_step(task, args.steps, args.repeats,
                                                                           args.warmup)})
    base = rows[0]
    print(f"| distillation | trainable parameters | s/step (batch {args.batch_size}) | step time vs full |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = r["s_per_step"] / base["s_per_step"]
        print(f"| {r['row']} | {r['trainable']:,} | {r['s_per_step']:.3f} | {ratio:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
