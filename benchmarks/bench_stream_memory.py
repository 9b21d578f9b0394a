"""Peak resident memory of `lcm distill` streaming latent shards of 2k and of 50k shapes-world samples, beside
the in-memory path (the world encoded into one tensor before step 1) at the same sizes.

For each size N: `lcm world export --format shards` writes N images, `lcm prepare` (two processes under
`accelerate launch`) turns them into latent shards, then `lcm distill --data 'LATENTS/{...}.tar'` runs --steps
steps; the baseline row is `lcm distill --num-data N` (today's in-memory path). Each distillation is its own
process; its peak RSS is that child's ru_maxrss (os.wait4). Prints the 50k / 2k ratio of each path.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_stream_memory.py --out reports/sd_scale/stream_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "latentcm.cli"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,50000", help="Comma-separated sample counts (first = the small one).")
    ap.add_argument("--steps", type=int, default=40, help="Distillation steps per run.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one, removed).")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    return ap.parse_args(argv)


def run_child(cmd: list[str], env: dict) -> tuple[float, float]:
    """Peak RSS (GB) and seconds of ``cmd``, measured on that child alone (os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return usage.ru_maxrss / 1e6, time.perf_counter() - t0  # ru_maxrss is in kB on Linux


def spec_of(folder: Path, count: int, shard_size: int) -> str:
    n = (count + shard_size - 1) // shard_size
    return str(folder / ("{%06d..%06d}.tar" % (0, n - 1))) if n > 1 else str(folder / "000000.tar")


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-stream-"))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "ACCELERATE_USE_CPU": "true"}
    train = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--validate-every", "0",
             "--checkpoint-every", str(args.steps)]
    rows = []
    try:
        for n in sizes:
            images, latents = work / f"images-{n}", work / f"latents-{n}"
            subprocess.run([*CLI, "world", "export", str(images), "--format", "shards", "--count", str(n),
                            "--shard-size", str(args.shard_size)], check=True, capture_output=True, env=env)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "-m", "latentcm.cli", "prepare", "--data", spec_of(images, n, args.shard_size),
                            "--out", str(latents)], check=True, capture_output=True,
                           env={**env, "OMP_NUM_THREADS": "1"})
            prepare_s = time.perf_counter() - t0
            shard_bytes = sum(p.stat().st_size for p in latents.glob("*.tar"))
            rss, sec = run_child([*CLI, "distill", "--out", str(work / f"run-latents-{n}"),
                                  "--data", spec_of(latents, n, args.shard_size), *train], env)
            rows.append({"path": "latent shards (streamed)", "samples": n, "peak_rss_gb": round(rss, 3),
                         "seconds": round(sec, 1), "prepare_s": round(prepare_s, 1),
                         "shard_mb": round(shard_bytes / 1e6, 1)})
            print(f"latent shards, {n:6d} samples: peak RSS {rss:.3f} GB ({sec:.0f} s; prepare {prepare_s:.0f} s, "
                  f"{shard_bytes / 1e6:.0f} MB of shards)", flush=True)
            shutil.rmtree(images)
            rss, sec = run_child([*CLI, "distill", "--out", str(work / f"run-memory-{n}"), "--num-data", str(n),
                                  *train], env)
            rows.append({"path": "in memory (baseline)", "samples": n, "peak_rss_gb": round(rss, 3),
                         "seconds": round(sec, 1)})
            print(f"in memory,     {n:6d} samples: peak RSS {rss:.3f} GB ({sec:.0f} s)", flush=True)
        ratios = {}
        for path in ("latent shards (streamed)", "in memory (baseline)"):
            by = {r["samples"]: r["peak_rss_gb"] for r in rows if r["path"] == path}
            ratios[path] = round(by[sizes[-1]] / by[sizes[0]], 3)
            print(f"{path}: peak RSS at {sizes[-1]} / at {sizes[0]} samples = {ratios[path]:.3f}")
        result = {"rows": rows, "ratio_largest_over_smallest": ratios, "steps": args.steps,
                  "batch_size": args.batch_size,
                  "machine": f"{os.cpu_count()} CPU cores, load average "
                             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
