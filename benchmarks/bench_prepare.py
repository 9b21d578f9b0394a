"""`lcm prepare` with 1 process against 2 processes under `accelerate launch`, on the same image shards.

Writes --count shapes-world images as image shards once, then times `lcm prepare` (image shards -> latent shards)
alternately with one process (all --threads torch threads) and with two (--threads / 2 each), --rounds times,
each run into a fresh folder, and prints the median ratio. It also checks that both wrote byte-identical shards.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_prepare.py --count 10000 --out reports/sd_scale/prepare.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000, help="World images.")
    ap.add_argument("--shard-size", type=int, default=1000, help="Images per shard.")
    ap.add_argument("--rounds", type=int, default=2, help="Runs of each configuration (interleaved).")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="Torch threads in all, per configuration.")
    ap.add_argument("--model", default="teacher", help="Model whose VAE and text encoder encode.")
    ap.add_argument("--workdir", default=None, help="Scratch folder (default: a temporary one, removed).")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    return ap.parse_args(argv)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.tar")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _run(processes: int, threads: int, spec: str, out: Path, model: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes)), "OMP_WAIT_POLICY": "PASSIVE",
           "ACCELERATE_USE_CPU": "true"}
    args = ["prepare", "--model", model, "--data", spec, "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, "-m", "latentcm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               "-m", "latentcm.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        shards = work / "images"
        subprocess.run([sys.executable, "-m", "latentcm.cli", "world", "export", str(shards), "--format", "shards",
                        "--count", str(args.count), "--shard-size", str(args.shard_size)], check=True,
                       capture_output=True)
        n = (args.count + args.shard_size - 1) // args.shard_size
        spec = str(shards / ("{%06d..%06d}.tar" % (0, n - 1)) if n > 1 else shards / "000000.tar")
        times, digests = {1: [], 2: []}, {}
        for r in range(args.rounds):
            for processes in (1, 2):
                out = work / f"latents-{processes}-{r}"
                times[processes].append(_run(processes, args.threads, spec, out, args.model))
                digests.setdefault(processes, _digest(out))
                shutil.rmtree(out)
                print(f"round {r}: {processes} process(es): {times[processes][-1]:.1f} s", flush=True)
        med = {p: statistics.median(t) for p, t in times.items()}
        result = {"count": args.count, "shards": n, "threads_total": args.threads, "rounds": args.rounds,
                  "seconds": times, "median_s": med, "speedup_2_over_1": round(med[1] / med[2], 3),
                  "images_per_s": {p: round(args.count / s, 1) for p, s in med.items()},
                  "identical_shards": digests[1] == digests[2],
                  "machine": f"{os.cpu_count()} CPU cores, load average "
                             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"}
        print(f"{args.count} images, {n} shards: 1 process {med[1]:.1f} s ({result['images_per_s'][1]} img/s), "
              f"2 processes {med[2]:.1f} s ({result['images_per_s'][2]} img/s): 2 / 1 speed-up "
              f"{result['speedup_2_over_1']:.2f}x; identical shards: {result['identical_shards']}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
