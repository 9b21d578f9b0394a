"""Fault soak of `lcm distill`: kill -9 at random points (a share of them during checkpoint writes), one SIGINT,
and a disk-full run; then check that nothing was lost.

On the micro teacher (untrained, built from configs) in its own temp folders, a distillation of --max-steps
steps (``--num-data 8 --batch-size 2 --checkpoint-every 2 --validate-every 0``) is started, killed and
resumed (``--resume``) again and again:

* random kills: SIGKILL at a random delay after start (start-up, data encoding) or a few optimizer steps in;
* mid-write kills: SIGKILL 0-3 ms after a checkpoint temp file (``checkpoints/.tmp-*``) appears, counted as
  mid-write only when the temp file is still there after the process died (the write was cut);
* one SIGINT a few steps in: must end with ``lcm: aborted`` and no traceback.

After every kill every checkpoint on disk must load. Then the run is resumed to the end and checked: the final
step is --max-steps, metrics.csv has each step once, no temp file is left, and the final weights (exported UNet
and the last checkpoint, optimizer state included) equal those of an uninterrupted run bit for bit.

Disk full: the same distillation on a small tmpfs (``mount -t tmpfs``; without the permission, a per-file size
limit, RLIMIT_FSIZE, in its place) that holds one checkpoint but not two: it must fail with one ``lcm: error:``
line naming the folder and the last good checkpoint, leave that checkpoint intact and no temp file, and resume
(moved to a roomy disk) to the uninterrupted run's weights.

    nice -n 10 .venv/bin/python scripts/fault_soak.py --out reports/reliability/soak.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from latentcm.training.checkpoint import list_checkpoints, read_checkpoint, temp_files

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TQDM_MININTERVAL="5")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


class Soak:
    def __init__(self, tmp: Path, max_steps: int, rng: random.Random, deadline: float):
        self.tmp, self.max_steps, self.rng, self.deadline = tmp, max_steps, rng, deadline
        self.teacher = tmp / "teacher"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.runs = 0
        self.data: list[str] = ["--num-data", "8"]  # or --data SHARDS (``use_shards``)

    def use_shards(self) -> None:
        """Distil from streamed webdataset shards of the world instead of cached in-memory tensors."""
        folder = self.tmp / "shards"
        subprocess.run([sys.executable, "-m", "latentcm.cli", "world", "export", str(folder), "--format", "shards",
                        "--count", "16", "--shard-size", "4"], check=True, env=_env(), stdout=subprocess.DEVNULL)
        self.data = ["--data", str(folder / "{000000..000003}.tar")]

    def argv(self, out: Path, resume: bool) -> list[str]:
        return [sys.executable, "-m", "latentcm.cli", "distill", "--teacher", str(self.teacher), "--out", str(out),
                *self.data, "--batch-size", "2", "--checkpoint-every", "2", "--validate-every", "0",
                "--max-steps", str(self.max_steps), *(["--resume"] if resume else [])]

    def start(self, out: Path, resume: bool, preexec=None) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        err = self.logs / f"run-{self.runs:03d}.err"
        def child_setup():  # a soak started in the background inherits SIGINT ignored: restore it for Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if preexec is not None:
                preexec()
        proc = subprocess.Popen(self.argv(out, resume), stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                                env=_env(), cwd=self.tmp, preexec_fn=child_setup)
        return proc, err

    def finish(self, out: Path, resume: bool, timeout: float = 600, preexec=None) -> tuple[int, str]:
        proc, err = self.start(out, resume, preexec)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        return code, err.read_text()


def metric_rows(out: Path) -> list[int]:
    try:
        with open(out / "metrics.csv", newline="") as fh:
            return [int(r["step"]) for r in csv.DictReader(fh)]
    except (FileNotFoundError, KeyError, ValueError):
        return []


def row_count(out: Path) -> int:
    try:
        return max(0, (out / "metrics.csv").read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def last_checkpoint_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return int(found[-1].stem.split("-")[1]) if found else 0


def check_checkpoints(out: Path) -> tuple[int, list[str]]:
    """(checkpoints read, names of those that do not load)."""
    bad, found = [], list_checkpoints(out / "checkpoints")
    for path in found:
        try:
            read_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is a finding
            bad.append(f"{path.name}: {exc}")
    return len(found), bad


def stray_temp_files(out: Path) -> list[str]:
    found = [p.name for p in temp_files(out / "checkpoints")]
    return found + [str(p.relative_to(out)) for p in out.rglob("*.tmp")] if out.is_dir() else found


def _poll(cond, proc: subprocess.Popen, timeout: float, pause: float = 0.002) -> bool:
    """Wait until cond() (True) or the process ends / the timeout passes (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if cond():
            return True
        if pause:
            time.sleep(pause)
    return False


def _new_temp(ckpt_dir: Path, before: set[str]):
    def cond() -> bool:
        try:
            return any(e.name.startswith(".tmp-") and e.name not in before for e in os.scandir(ckpt_dir))
        except FileNotFoundError:
            return False
    return cond


def last_step(out: Path, since: float) -> int:
    """The step of metrics.csv's last complete row once this run has written to it (after ``since``), else -1."""
    path = out / "metrics.csv"
    try:
        if path.stat().st_mtime < since:
            return -1
        lines = path.read_bytes().split(b"\n")
        return int(lines[-2].split(b",", 1)[0]) if len(lines) > 2 else 0
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _kill(proc: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` unless the process already ended; True when it was sent."""
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def kill_random(soak: Soak, out: Path, resume: bool) -> dict:
    base = last_checkpoint_step(out)
    since = time.time()
    proc, err = soak.start(out, resume)
    if soak.rng.random() < 0.3:  # anywhere: start-up, model loading, data encoding, the first steps
        where = "delay"
        time.sleep(soak.rng.uniform(0.2, 12.0))
    else:
        where = "steps"
        k = soak.rng.randint(1, 7)
        _poll(lambda: last_step(out, since) >= base + k, proc, 180)
        time.sleep(soak.rng.uniform(0, 0.15))
    killed = _kill(proc, signal.SIGKILL)
    proc.wait()
    return {"kind": "random", "where": where, "killed": killed, "exit": proc.returncode, "log": err.name}


def kill_mid_write(soak: Soak, out: Path, resume: bool) -> dict:
    ckpt_dir = out / "checkpoints"
    before = {p.name for p in temp_files(ckpt_dir)}  # orphans of earlier kills (the run removes them)
    proc, err = soak.start(out, resume)
    nth = soak.rng.randint(1, 3)  # cut the n-th checkpoint write of this run, so runs also make progress
    seen = set(before)
    for i in range(nth):
        if not _poll(_new_temp(ckpt_dir, seen), proc, 180, pause=0.0003):
            break
        if i < nth - 1:  # let this write finish, then watch for the next one
            current = {p.name for p in temp_files(ckpt_dir)} - seen
            seen |= current
            _poll(lambda: not current & {p.name for p in temp_files(ckpt_dir)}, proc, 30, pause=0.0003)
    delay = soak.rng.uniform(0, 0.003)
    time.sleep(delay)
    killed = _kill(proc, signal.SIGKILL)
    proc.wait()
    orphans = [p.name for p in temp_files(ckpt_dir) if p.name not in before]
    return {"kind": "mid-write", "killed": killed, "mid_write": bool(orphans) and killed, "orphans": orphans,
            "delay_ms": round(1000 * delay, 2), "nth_write": nth, "exit": proc.returncode, "log": err.name}


def interrupt(soak: Soak, out: Path, resume: bool) -> dict:
    base = last_checkpoint_step(out)
    since = time.time()
    proc, err = soak.start(out, resume)
    k = soak.rng.randint(2, 5)
    _poll(lambda: last_step(out, since) >= base + k, proc, 180)
    sent = _kill(proc, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    text = err.read_text()
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return {"kind": "sigint", "sent": sent, "exit": code, "last_line": last[-200:],
            "clean": sent and code == 1 and last.endswith("lcm: aborted") and "Traceback" not in text,
            "log": err.name}


def weights_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    import torch

    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def final_checks(out: Path, ref: Path, max_steps: int) -> dict:
    rows = metric_rows(out)
    checked, bad = check_checkpoints(out)
    unet = "unet/diffusion_pytorch_model.safetensors"
    last_ref, last_out = list_checkpoints(ref / "checkpoints")[-1], list_checkpoints(out / "checkpoints")
    return {
        "final_step": last_checkpoint_step(out),
        "lost_steps": max_steps - last_checkpoint_step(out),
        "metric_rows": len(rows),
        "missing_metric_steps": sorted(set(range(1, max_steps + 1)) - set(rows)),
        "duplicate_metric_steps": sorted({s for s in rows if rows.count(s) > 1}),
        "checkpoints_at_end": checked, "corrupt_checkpoints_at_end": bad,
        "temp_files_left": stray_temp_files(out),
        "final_weights_equal_uninterrupted": (out / unet).is_file() and weights_equal(out / unet, ref / unet),
        "final_checkpoint_equal_uninterrupted": bool(last_out) and last_out[-1].name == last_ref.name
        and weights_equal(last_out[-1], last_ref),
    }


def disk_full(soak: Soak, ref: Path) -> dict:
    """A run on a disk that holds one checkpoint: a clear one-line failure, the previous checkpoint intact."""
    mnt = soak.tmp / "small-disk"
    mnt.mkdir()
    ckpt_bytes = list_checkpoints(ref / "checkpoints")[-1].stat().st_size
    cache = ref / "data-cache.safetensors"  # none when streaming shards
    cache_bytes = cache.stat().st_size if cache.is_file() else 0
    size_kib = (cache_bytes + int(1.6 * ckpt_bytes)) // 1024 + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                             capture_output=True, text=True).returncode == 0
    result = {"method": f"tmpfs of {size_kib} KiB (one {ckpt_bytes // 1024} KiB checkpoint fits, two do not)"
              if mounted else f"RLIMIT_FSIZE {int(0.5 * ckpt_bytes) // 1024} KiB per file (no permission to mount)"}
    out = mnt / "run"
    try:
        if mounted:
            code, err = soak.finish(out, False)
        else:  # a first checkpoint normally, then every write cut at half a checkpoint
            limit = int(0.5 * ckpt_bytes)

            def preexec():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            proc, _ = soak.start(out, False)
            _poll(lambda: last_checkpoint_step(out) >= 2, proc, 180)
            proc.kill()
            proc.wait()
            code, err = soak.finish(out, True, preexec=preexec)
        lines = [line for line in err.strip().splitlines() if line.startswith("lcm: ")]
        message = lines[-1] if lines else err.strip().splitlines()[-1:]
        checked, bad = check_checkpoints(out)
        good = list_checkpoints(out / "checkpoints")
        result.update({
            "exit": code, "message": message, "traceback": "Traceback" in err,
            "one_line": len(lines) == 1 and err.strip().splitlines()[-1] == lines[0],
            "names_folder_and_last_good": bool(good) and str(out / "checkpoints") in str(message)
            and f"last good checkpoint: {good[-1].name}" in str(message),
            "checkpoints_left": [p.name for p in good], "corrupt_checkpoints": bad,
            "previous_checkpoint_intact": bool(good) and not bad,
            "temp_files_left": stray_temp_files(out),
        })
        moved = soak.tmp / "disk-full-resumed"
        shutil.copytree(out, moved, symlinks=True)  # off the full disk, then resumed to the end
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    code, err = soak.finish(moved, True)
    end = final_checks(moved, ref, soak.max_steps)
    result.update({"resumed_exit": code, "resumed_final_step": end["final_step"],
                   "resumed_equal_uninterrupted": end["final_weights_equal_uninterrupted"]
                   and end["final_checkpoint_equal_uninterrupted"]})
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=24, help="SIGKILLs in all (the mid-write ones included)")
    ap.add_argument("--mid-write", type=int, default=8, help="confirmed mid-write kills wanted among them")
    ap.add_argument("--max-steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=15.0, help="stop killing after this long (then finish)")
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    ap.add_argument("--shards", action="store_true", help="distil from streamed world shards (--data SHARDS)")
    args = ap.parse_args(argv)
    t0 = time.time()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="lcm-soak-"))
    try:
        soak = Soak(tmp, args.max_steps, rng, t0 + 60 * args.minutes)
        from latentcm.models.components import tiny_sd_pipeline

        tiny_sd_pipeline().save_pretrained(soak.teacher, safe_serialization=True)
        if args.shards:
            soak.use_shards()
        ref = tmp / "uninterrupted"
        code, err = soak.finish(ref, False)
        if code != 0:
            raise SystemExit(f"the uninterrupted run failed ({code}):\n{err[-2000:]}")
        print(f"uninterrupted run: {time.time() - t0:.0f} s", flush=True)

        out = tmp / "soak"
        events, kills, mid = [], 0, 0
        sigint_at = rng.randint(2, max(2, args.kills // 2))
        checkpoints_checked, corrupt = 0, []
        orphans_after_kills = 0
        while (kills < args.kills or mid < args.mid_write) and time.time() < soak.deadline:
            if last_checkpoint_step(out) >= args.max_steps - 4:
                break  # keep the end for the final, uninterrupted resume
            resume = out.exists()
            need_mid = args.mid_write - mid
            left = args.kills - kills
            if len(events) == sigint_at:
                ev = interrupt(soak, out, resume)
            elif need_mid > 0 and (left <= need_mid or rng.random() < 0.45):
                ev = kill_mid_write(soak, out, resume)
            else:
                ev = kill_random(soak, out, resume)
            kills += ev["kind"] != "sigint" and ev.get("killed", False)
            mid += bool(ev.get("mid_write"))
            orphans_after_kills += len(ev.get("orphans", []))
            n, bad = check_checkpoints(out)
            checkpoints_checked += n
            corrupt += bad
            ev.update({"resumed": resume, "checkpoint_step": last_checkpoint_step(out), "metric_rows": row_count(out),
                       "corrupt": bad})
            events.append(ev)
            print(f"[{time.time() - t0:5.0f} s] {ev['kind']:9} killed={ev.get('killed', ev.get('sent'))} "
                  f"mid_write={ev.get('mid_write', '-')} step={ev['checkpoint_step']} rows={ev['metric_rows']}",
                  flush=True)
        replayed = sum(max(0, e["metric_rows"] - e["checkpoint_step"]) for e in events)
        code, err = soak.finish(out, True)
        end = final_checks(out, ref, args.max_steps)
        end["final_exit"] = code
        print(f"final resume: exit {code}, step {end['final_step']}", flush=True)
        full = disk_full(soak, ref)
        print(f"disk full: {full.get('message')}", flush=True)
        sigints = [e for e in events if e["kind"] == "sigint"]
        summary = {
            "command": "nice -n 10 .venv/bin/python scripts/fault_soak.py " + " ".join(argv or sys.argv[1:]),
            "distill": " ".join(["lcm", *soak.argv(Path("OUT"), False)[3:]]).replace(str(soak.teacher), "MICRO"),
            "seed": args.seed, "max_steps": args.max_steps,
            "kills": kills, "mid_write_kills": mid,
            "mid_write_attempts": sum(e["kind"] == "mid-write" for e in events),
            "sigint": {"count": len(sigints), "clean": all(e["clean"] for e in sigints)},
            "resumes": sum(e["resumed"] for e in events) + 1,
            "replayed_steps": replayed,
            "orphan_temp_files_after_kills": orphans_after_kills,
            "checkpoints_checked_after_kills": checkpoints_checked,
            "corrupt_checkpoints": len(corrupt) + len(end["corrupt_checkpoints_at_end"]),
            **end,
            "disk_full": full,
            "seconds": round(time.time() - t0, 1),
            "events": events,
        }
        ok = (summary["kills"] >= 20 and mid >= 5 and summary["sigint"]["clean"] and summary["lost_steps"] == 0
              and summary["corrupt_checkpoints"] == 0 and not end["temp_files_left"] and code == 0
              and not end["missing_metric_steps"] and not end["duplicate_metric_steps"]
              and end["final_weights_equal_uninterrupted"] and end["final_checkpoint_equal_uninterrupted"]
              and full.get("exit") == 2 and full.get("one_line") and full.get("previous_checkpoint_intact")
              and not full.get("temp_files_left") and full.get("resumed_equal_uninterrupted"))
        summary["passed"] = bool(ok)
        print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
