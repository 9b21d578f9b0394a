"""Kill `lcm serve` mid-request, restart it, and check that nothing half-made ever reaches a client.

    python scripts/serve_soak.py [--rounds 10] [--clients 4] [--lcm lcm] [--minutes 8]
                                 [--out reports/reliability/serve_soak.json]

Each round starts the server on a free loopback port (no UI, no teacher), sends ``--clients`` concurrent
``POST /api/generate`` requests, kills the server with SIGKILL after a random delay while they are in
flight, restarts it, and checks ``/health`` and one fresh request. Every in-flight request must end in a
complete answer (every image a decodable PNG of the requested size and count) or a connection error;
a partial or undecodable image counts as a failure. Bounded in rounds and wall time; loopback only.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

PROMPT = "a large red circle on a blue background"


def start(lcm: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """The server in a subprocess and its base URL (read from its 'serving http://...' line)."""
    proc = subprocess.Popen([sys.executable, "-m", "latentcm.cli", "serve", "--port", "0", "--no-ui", "--lcm", lcm,
                             "--teacher", "none", "--max-batch", "4", "--batch-window-ms", "10"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    timer = threading.Timer(timeout, proc.kill)  # a server that never comes up must not hang the soak
    timer.start()
    log = []
    try:
        for line in proc.stderr:
            log.append(line)
            if (found := re.match(r"serving (http://\S+)", line)):
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining the pipe
                return proc, found.group(1).rstrip("/") + "/"
    finally:
        timer.cancel()
    raise RuntimeError("server did not start:\n" + "".join(log[-20:]))


def generate(url: str, seed: int, num_images: int = 2, timeout: float = 120.0) -> dict:
    """One request's outcome: 'complete' (every image a PNG of 64 x 64, as many as asked), 'error' (a
    connection error or an HTTP error status) or 'broken' (an answer with a partial or bad image)."""
    body = json.dumps({"prompt": PROMPT, "steps": 4, "seed": seed, "num_images": num_images}).encode()
    request = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        raw = urllib.request.urlopen(request, timeout=timeout).read()
    except (urllib.error.URLError, ConnectionError, OSError, http_errors()) as exc:
        return {"outcome": "error", "why": type(exc).__name__}
    try:
        images = json.loads(raw)["images"]
        if len(images) != num_images:
            return {"outcome": "broken", "why": f"{len(images)} images"}
        for b64 in images:
            with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                im.load()
                if im.size != (64, 64):
                    return {"outcome": "broken", "why": f"size {im.size}"}
    except Exception as exc:  # a truncated body that still parsed partly would land here
        return {"outcome": "broken", "why": f"{type(exc).__name__}: {exc}"}
    return {"outcome": "complete"}


def http_errors():
    import http.client

    return http.client.HTTPException


def round_once(lcm: str, clients: int, rng: random.Random) -> dict:
    """Start, load, kill -9 mid-flight, restart, check: one round's counts."""
    proc, url = start(lcm)
    outcomes: list[dict] = []
    threads = [threading.Thread(target=lambda s=s: outcomes.append(generate(url, s))) for s in range(clients)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.05, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for t in threads:
        t.join(timeout=150)
    proc, url = start(lcm)  # restart on a fresh port
    try:
        health = json.load(urllib.request.urlopen(url + "health", timeout=30))
        after = generate(url, 99, num_images=1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("complete", "error", "broken")}
    return {**counts, "answered": len(outcomes), "restart_health": health.get("status"),
            "restart_generate": after["outcome"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--lcm", default="lcm")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng, t0, rounds = random.Random(args.seed), time.time(), []
    for i in range(args.rounds):
        if time.time() - t0 > 60 * args.minutes:
            break
        rounds.append(round_once(args.lcm, args.clients, rng))
        print(json.dumps({"round": i, **rounds[-1]}), flush=True)
    total = {k: sum(r[k] for r in rounds) for k in ("complete", "error", "broken", "answered")}
    ok = (total["broken"] == 0 and total["answered"] == args.clients * len(rounds)
          and all(r["restart_health"] == "ok" and r["restart_generate"] == "complete" for r in rounds))
    result = {"command": " ".join(["python", *sys.argv]), "rounds": len(rounds), "clients": args.clients,
              "kills": len(rounds), **total, "restarts_serving": sum(r["restart_generate"] == "complete" for r in rounds),
              "passed": ok, "seconds": round(time.time() - t0, 1), "per_round": rounds}
    print(json.dumps({k: v for k, v in result.items() if k != "per_round"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
