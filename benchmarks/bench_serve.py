"""Load benchmark of `lcm serve` on loopback: 1, 4 and 16 concurrent clients, batching on and off.

Two server processes run side by side (`lcm serve --no-ui --teacher none`, 127.0.0.1, free ports), one with
batching on and one with it off; each round runs every client count against both, back to back (the order
alternating from round to round), so on and off see the same load on a shared machine. Closed-loop clients
(each sends its next request when the last is answered) until the setting's request count is reached. Every
request is one 64x64 LCM image at 4 steps with its own seed. Printed and written: p50 / p95 latency, images/s,
the per-round ratio on / off (median and range), and the count of every status code (every request is answered;
none may be lost). Bounded: at most --requests-per-client x clients requests per setting (64 at most) and
--max-seconds overall.

    python benchmarks/bench_serve.py                                 # writes reports/serve/bench.{json,md}
    python benchmarks/bench_serve.py --clients 1,4 --requests-per-client 2 --rounds 2 --out /tmp/bench
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
            "mean_batch_images": round(statistics.mean(batch_sizes), 2) if batch_sizes else None,
            "latencies": latencies}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="Comma-separated client counts.")
    ap.add_argument("--requests-per-client", type=int, default=4, help="Requests per client (64 per setting at most).")
    ap.add_argument("--min-requests", type=int, default=16, help="At least this many requests per setting.")
    ap.add_argument("--rounds", type=int, default=5, help="Rounds; each runs every setting with batching on and off.")
    ap.add_argument("--steps", type=int, default=4, help="LCM steps per request.")
    ap.add_argument("--max-batch", type=int, default=16, help="Batching on: images per UNet batch.")
    ap.add_argument("--window-ms", type=float, default=20.0, help="Batching on: the batching window.")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="Stop issuing requests after this long in all.")
    ap.add_argument("--server-args", default="", help="Extra `lcm serve` arguments, e.g. '--dtype bf16'.")
    ap.add_argument("--out", default=str(ROOT / "reports" / "serve"), help="Folder for bench.json and bench.md.")
    return ap.parse_args(argv)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_rounds(args, urls: dict[str, str], counts: list[int], deadline: float) -> list[dict]:
    """Every round runs each client count with batching on and off back to back (the order alternating from
    round to round), so both see the same load on the machine; one row per (round, clients, batching)."""
    rows = []
    for rnd in range(args.rounds):
        for clients in counts:
            total = min(64, max(args.min_requests, clients * args.requests_per_client))
            for batching in (("on", "off") if (rnd + clients) % 2 == 0 else ("off", "on")):
                row = {"round": rnd, "batching": batching,
                       **run_clients(urls[batching], clients, total, deadline, args.steps)}
                rows.append(row)
                print(f"round {rnd} batching {batching:3s} clients {clients:2d}: {row['requests']:3d} requests "
                      f"{row['statuses']}, p50 {row['p50_s']} s, p95 {row['p95_s']} s, {row['images_per_s']} images/s, "
                      f"mean batch {row['mean_batch_images']}", flush=True)
    return rows


def summarize(rows: list[dict], counts: list[int]) -> list[dict]:
    """Per client count and batching: latency p50 / p95 over every request of every round, the median images/s;
    per client count the per-round ratio of images/s on / off and the difference of p50 latency, median and range."""
    out = []
    for clients in counts:
        mine = {b: [r for r in rows if r["clients"] == clients and r["batching"] == b] for b in ("on", "off")}
        row = {"clients": clients}
        for b, rs in mine.items():
            lat = [x for r in rs for x in r["latencies"]]
            row[b] = {"requests": sum(r["requests"] for r in rs), "ok": len(lat),
                      "p50_s": round(percentile(lat, 0.5), 4) if lat else None,
                      "p95_s": round(percentile(lat, 0.95), 4) if lat else None,
                      "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 2),
                      "mean_batch_images": round(statistics.mean(r["mean_batch_images"] or 0 for r in rs), 2)}
        pairs = [(on, off) for on, off in zip(mine["on"], mine["off"]) if off["images_per_s"] and on["p50_s"]
                 and off["p50_s"]]
        ratio = [on["images_per_s"] / off["images_per_s"] for on, off in pairs]
        added = [on["p50_s"] - off["p50_s"] for on, off in pairs]
        row["speedup"] = [round(statistics.median(ratio), 2), round(min(ratio), 2), round(max(ratio), 2)] if ratio else None
        row["p50_added_s"] = [round(statistics.median(added), 4), round(min(added), 4), round(max(added), 4)] \
            if added else None
        out.append(row)
    return out


def markdown(result: dict, argv) -> str:
    lines = ["# `lcm serve` load benchmark (loopback)\n",
             f"Machine: {result['machine']}. One 64x64 LCM image at {result['steps']} steps per request; closed-loop "
             f"clients; batching on = max batch {result['max_batch']}, window {result['window_ms']:g} ms; off = max "
             f"batch 1; both servers run side by side and every round runs each client count on and off back to back "
             f"(order alternating), {result['rounds']} rounds. Latency p50 / p95 over every request of every round; "
             "images/s: median over rounds; on / off: per-round ratio of images/s, median [min, max]; p50 added: "
             "per-round p50 on - p50 off. Command: `python benchmarks/bench_serve.py"
             f"{' ' + ' '.join(argv) if argv else ''}`.\n",
             "| clients | on: requests | on: p50 / p95 latency (s) | on: images/s | on: mean batch | off: requests | "
             "off: p50 / p95 latency (s) | off: images/s | images/s on / off | p50 added by batching (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        on, off, sp, ad = s["on"], s["off"], s["speedup"], s["p50_added_s"]
        lines.append(f"| {s['clients']} | {on['ok']}/{on['requests']} | {on['p50_s']} / {on['p95_s']} | "
                     f"{on['images_per_s']} | {on['mean_batch_images']} | {off['ok']}/{off['requests']} | "
                     f"{off['p50_s']} / {off['p95_s']} | {off['images_per_s']} | "
                     f"{f'{sp[0]}x [{sp[1]}, {sp[2]}]' if sp else '-'} | "
                     f"{f'{ad[0]:+.3f} [{ad[1]:+.3f}, {ad[2]:+.3f}]' if ad else '-'} |")
    lines.append("\nStatus codes over all rounds: " + ", ".join(f"{k}: {v}" for k, v in result["statuses"].items())
                 + ". Every round's rows are in bench.json.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    start = time.monotonic()
    procs, urls = [], {}
    try:
        for batching, max_batch in (("on", args.max_batch), ("off", 1)):
            proc, url = start_server(max_batch, args.window_ms, 64, args.server_args.split())
            procs.append(proc)
            urls[batching] = url
            httpx.post(url + "api/generate", json={"prompt": PROMPTS[0], "steps": args.steps}, timeout=120)  # warm
        rows = run_rounds(args, urls, counts, start + args.max_seconds)
    finally:
        for proc in procs:
            stop(proc)
    statuses: dict[str, int] = {}
    for r in rows:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    machine = f"{platform.machine()} {os.cpu_count()} CPU cores, shared with other jobs (a background training " \
              "job among them); load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    summary = summarize(rows, counts)
    result = {"machine": machine, "steps": args.steps, "max_batch": args.max_batch, "window_ms": args.window_ms,
              "rounds": args.rounds, "server_args": args.server_args, "summary": summary, "statuses": statuses,
              "rows": [{k: v for k, v in r.items() if k != "latencies"} for r in rows],
              "seconds": round(time.monotonic() - start, 1),
              "every_request_answered": all(r["requests"] == sum(r["statuses"].values()) for r in rows)}
    print("images/s with batching on / off, median [min, max] over rounds:",
          {s["clients"]: s["speedup"] for s in summary})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result, argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
