"""Load benchmark of `lcm serve` on loopback: 1, 4 and 16 concurrent clients, batching on and off.

Each setting starts its own server process (`lcm serve --no-ui --teacher none`, 127.0.0.1, a free port) and
closed-loop clients (each sends its next request when the last is answered) until the setting's request count
is reached. Every request is one 64x64 LCM image at 4 steps with its own seed. Printed and written: p50 / p95
latency, images/s, and the count of every status code (every request is answered; none may be lost).
Bounded: at most --requests-per-client x clients requests per setting (64 at most) and --max-seconds overall.

    python benchmarks/bench_serve.py                                 # writes reports/serve/bench.{json,md}
    python benchmarks/bench_serve.py --clients 1,4 --requests-per-client 2 --out /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a large red circle on a blue background", "a small green star on a white background",
           "a blue square on a yellow background", "a large purple triangle on a grey background")


def start_server(max_batch: int, window_ms: float, max_queue: int, extra: list[str], timeout: float = 240.0):
    """A `lcm serve --no-ui` subprocess on a free loopback port; (process, base url)."""
    cmd = [sys.executable, "-m", "latentcm.cli", "serve", "--no-ui", "--teacher", "none", "--port", "0",
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--max-queue", str(max_queue), *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE")))
    found: list[str] = []

    def read():
        for line in proc.stderr:
            m = re.search(r"serving (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.05)
    return proc, found[0]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_clients(url: str, clients: int, total: int, deadline: float, steps: int) -> dict:
    """``clients`` closed-loop clients sharing ``total`` requests; latencies and status counts."""
    lock, counter = threading.Lock(), [0]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    batch_sizes: list[int] = []

    def client(k: int):
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if counter[0] >= total or time.monotonic() > deadline:
                        return
                    i = counter[0]
                    counter[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps})
                    status = str(r.status_code)
                    if r.status_code == 200:
                        batch_sizes.append(r.json()["timings"]["batch_images"])
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(dt)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ok = statuses.get("200", 0)
    return {"clients": clients, "requests": sum(statuses.values()), "statuses": statuses, "wall_s": round(wall, 3),
            "images_per_s": round(ok / wall, 2), "p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
            "p95_s": round(percentile(latencies, 0.95), 4) if latencies else None,
            "mean_batch_images": round(statistics.mean(batch_sizes), 2) if batch_sizes else None}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="Comma-separated client counts.")
    ap.add_argument("--requests-per-client", type=int, default=4, help="Requests per client (64 per setting at most).")
    ap.add_argument("--min-requests", type=int, default=16, help="At least this many requests per setting.")
    ap.add_argument("--steps", type=int, default=4, help="LCM steps per request.")
    ap.add_argument("--max-batch", type=int, default=16, help="Batching on: images per UNet batch.")
    ap.add_argument("--window-ms", type=float, default=20.0, help="Batching on: the batching window.")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="Stop issuing requests after this long in all.")
    ap.add_argument("--server-args", default="", help="Extra `lcm serve` arguments, e.g. '--dtype bf16'.")
    ap.add_argument("--out", default=str(ROOT / "reports" / "serve"), help="Folder for bench.json and bench.md.")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    start = time.monotonic()
    deadline = start + args.max_seconds
    rows = []
    for batching in (True, False):
        max_batch = args.max_batch if batching else 1
        proc, url = start_server(max_batch, args.window_ms, 64, args.server_args.split())
        try:
            httpx.post(url + "api/generate", json={"prompt": PROMPTS[0], "steps": args.steps}, timeout=120)  # warm
            for clients in counts:
                total = min(64, max(args.min_requests, clients * args.requests_per_client))
                row = run_clients(url, clients, total, deadline, args.steps)
                row["batching"] = "on" if batching else "off"
                rows.append(row)
                print(f"batching {row['batching']:3s} clients {clients:2d}: {row['requests']:3d} requests "
                      f"{row['statuses']}, p50 {row['p50_s']} s, p95 {row['p95_s']} s, {row['images_per_s']} images/s, "
                      f"mean batch {row['mean_batch_images']}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratios = {}
    for clients in counts:
        on = next((r for r in rows if r["clients"] == clients and r["batching"] == "on"), None)
        off = next((r for r in rows if r["clients"] == clients and r["batching"] == "off"), None)
        if on and off and off["images_per_s"]:
            ratios[str(clients)] = round(on["images_per_s"] / off["images_per_s"], 2)
    machine = f"{platform.machine()} {os.cpu_count()} CPU cores, shared with other jobs; load average " + \
              " ".join(f"{x:.1f}" for x in os.getloadavg())
    result = {"machine": machine, "steps": args.steps, "max_batch": args.max_batch, "window_ms": args.window_ms,
              "server_args": args.server_args, "rows": rows, "batching_speedup_images_per_s": ratios,
              "seconds": round(time.monotonic() - start, 1),
              "every_request_answered": all(r["requests"] == sum(r["statuses"].values()) for r in rows)}
    print("images/s with batching on / off:", ratios)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `lcm serve` load benchmark (loopback)\n", f"Machine: {machine}. One 64x64 LCM image at {args.steps} "
             f"steps per request; closed-loop clients; batching on = max batch {args.max_batch}, window "
             f"{args.window_ms:g} ms; off = max batch 1. Command: `python benchmarks/bench_serve.py"
             f"{' ' + ' '.join(argv) if argv else ''}`.\n",
             "| batching | clients | requests | statuses | p50 latency (s) | p95 latency (s) | images/s | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batching']} | {r['clients']} | {r['requests']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | {r['p50_s']} | {r['p95_s']} | "
                     f"{r['images_per_s']} | {r['mean_batch_images']} |")
    lines.append("\nimages/s, batching on / off: " + ", ".join(f"{c} clients {v}x" for c, v in ratios.items()))
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
