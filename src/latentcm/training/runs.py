"""A run folder's files: resume from the newest readable checkpoint, save one, and metrics.csv (one row per step,
cut back to the checkpoint on resume so a resumed run logs every step once)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..files import write_text
from .checkpoint import (CheckpointReadError, clean_temp_files, list_checkpoints, load_checkpoint,
                         prune_checkpoints, save_checkpoint)

log = logging.getLogger(__name__)
METRICS = "metrics.csv"


def resume_latest(task, opt, ckpt_dir: Path, main: bool = True) -> dict:
    """Load the newest readable checkpoint in ``ckpt_dir`` and return its metadata ({"step": 0} when there is
    none). Unreadable newer ones are skipped with a warning and (main process) renamed ``*.unreadable``;
    CheckpointReadError when checkpoints exist but none is readable."""
    found = list_checkpoints(ckpt_dir)
    if not found:
        return {"step": 0}
    bad: list[tuple[Path, CheckpointReadError]] = []
    for path in reversed(found):
        try:
            meta = load_checkpoint(path, task.modules(), opt)
        except CheckpointReadError as exc:
            bad.append((path, exc))
            continue
        for old, exc in bad:
            log.warning("warning: skipping %s: %s; resuming from %s", old.name, str(exc).splitlines()[0], path.name)
            if main:
                try:
                    old.replace(old.with_name(old.name + ".unreadable"))
                except OSError:
                    pass
        return meta
    raise CheckpointReadError(f"no readable checkpoint in {ckpt_dir} ({len(bad)} found, e.g. {bad[0][1]})")


def truncate_metrics(path: str | Path, step: int) -> int:
    """Cut ``metrics.csv`` back to the rows of steps 1..``step`` (one each, the last written; a partial last
    line of a killed run is dropped), so a resumed run logs every step once. Returns the rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(errors="replace").split("\n")
    header, body, partial = lines[0], lines[1:-1], lines[-1]  # a kill mid-write leaves a partial last line
    rows: dict[int, str] = {}
    for line in body:
        try:
            at = int(line.split(",", 1)[0])
        except ValueError:
            continue
        if 1 <= at <= step:
            rows[at] = line
    dropped = len(body) + (bool(partial) and len(lines) > 1) - len(rows)
    if len(lines) == 1:  # not even a complete header
        rows = {}
    if not rows:
        path.unlink()
        return dropped
    if dropped:
        write_text(path, "\n".join([header, *(rows[k] for k in sorted(rows))]) + "\n")
    return dropped


def log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def training_minutes(out_dir: str | Path) -> float:
    """Wall minutes of a run's optimizer steps: time_s of the last row of OUT/metrics.csv (carried over resumes)."""
    with open(Path(out_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{out_dir}/metrics.csv has no rows")
    return round(float(rows[-1]["time_s"]) / 60, 2)


def save_step(task, opt, accelerator, ckpt_dir: Path, keep: int, meta: dict) -> None:
    """Checkpoint the unwrapped modules + optimizer, on the main process only."""
    if accelerator.is_main_process:
        modules = {k: accelerator.unwrap_model(m) for k, m in task.modules().items()}
        save_checkpoint(ckpt_dir / f"step-{meta['step']:07d}.safetensors", modules, opt, meta)
        prune_checkpoints(ckpt_dir, keep)
    accelerator.wait_for_everyone()


def check_fresh(out_dir: str | Path, resume: bool) -> None:
    """Refuse to start over a run that already has checkpoints unless resuming."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --resume or use a new --out")




def clean_run_folder(out: Path) -> None:
    """Remove what interrupted writes left in a run folder: checkpoint temp files and metrics.csv temp files."""
    for orphan in clean_temp_files(out / "checkpoints"):
        log.info("removed %s (an interrupted checkpoint write)", orphan)
    for orphan in [out / "metrics.csv.tmp", *out.glob("metrics.tmp*.csv")]:  # of an interrupted truncate_metrics
        orphan.unlink(missing_ok=True)
