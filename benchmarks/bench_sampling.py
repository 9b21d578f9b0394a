"""Sampling throughput, from one run: images/s of the LCM at 1/2/4 steps against the teacher's DDIM at
25 and 50 steps with classifier-free guidance (two UNet passes per step). Each row times the whole
text -> image path (text encoder, sampler, VAE decode) of one batch; best of --repeats after --warmup
untimed runs. Ratios are against the teacher's 50-step row of the same run.

    python benchmarks/bench_sampling.py                       # the shipped lcm and teacher
    python benchmarks/bench_sampling.py --lcm runs/lcm --teacher runs/build/teacher --batch-size 16
"""
from __future__ import annotations

import argparse
import time

import torch

from latentcm import registry
from latentcm.evaluation.compare import Row
from latentcm.bundle import Bundle

PROMPT = "a large red circle on a blue background"
ROWS = (Row("lcm", "lcm", 1, 8.5), Row("lcm", "lcm", 2, 8.5), Row("lcm", "lcm", 4, 8.5),
        Row("teacher", "ddim", 25, 7.5), Row("teacher", "ddim", 50, 7.5))
BASELINE = ROWS[-1]


def best_seconds(bundle: Bundle, row: Row, batch_size: int, repeats: int, warmup: int) -> float:
    """Best wall time of ``repeats`` timed batches after ``warmup`` untimed ones."""
    seeds = list(range(batch_size))
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        bundle.generate([PROMPT] * batch_size, seeds, row.sampler, row.steps, row.guidance)
        if bundle.unet.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lcm", default="lcm", help="Shipped LCM name or LCM folder.")
    ap.add_argument("--teacher", default="teacher", help="Shipped teacher name or teacher folder.")
    ap.add_argument("--batch-size", type=int, default=8, help="Images per timed batch.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed batches per row (best is kept).")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed batches per row first.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, and return its rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundles = {"lcm": Bundle.load(registry.resolve(args.lcm)).to(args.device),
               "teacher": Bundle.load(registry.resolve(args.teacher)).to(args.device)}
    results = []
    for row in ROWS:
        sec = best_seconds(bundles[row.model], row, args.batch_size, args.repeats, args.warmup)
        results.append({"row": row.label.replace("\n", " "), "unet_evals": bundles[row.model].unet_evals_per_image(
            row.sampler, row.steps), "images_per_s": args.batch_size / sec, "seconds": sec})
    base = results[ROWS.index(BASELINE)]["images_per_s"]
    print(f"device {args.device}, batch {args.batch_size}, best of {args.repeats} after {args.warmup} warm-up, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'sampler':34s} {'UNet evals/img':>14s} {'images/s':>10s} {'x teacher-50':>12s}")
    for r in results:
        r["ratio"] = r["images_per_s"] / base
        print(f"{r['row']:34s} {r['unet_evals']:14d} {r['images_per_s']:10.2f} {r['ratio']:12.2f}")
    return results


if __name__ == "__main__":
    main()
