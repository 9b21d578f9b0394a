"""Atomic safetensors checkpoints of modules + optimizer state (no pickle anywhere).

A checkpoint is written to a temp file in its folder (``step-0000012.tmp<pid>.safetensors``), fsynced,
renamed over ``step-0000012.safetensors`` and the folder fsynced: a kill at any point leaves either the
old set of checkpoints or the new one, plus at most one orphan temp file, which ``clean_temp_files``
removes on the next start. A failed write (disk full, read-only folder, ...) removes its temp file and
raises :class:`CheckpointWriteError`, one line naming the folder and the last good checkpoint.
Loading reads and checks the whole file before touching a module, so an unreadable checkpoint
(:class:`CheckpointReadError`) leaves the modules and optimizer as they were.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_path

CKPT_RE = re.compile(r"step-(\d+)\.safetensors$")
TEMP_RE = re.compile(r"^step-\d+\.tmp\d+\.safetensors$")  # files.atomic_path's temp of a checkpoint
TEMP_PREFIX = ".tmp-"
_LEGACY_TEMP_RE = re.compile(r"^(step-\d+\.safetensors\.tmp|\.tmp\w+)$")  # older writers' temp names


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the folder and the last good checkpoint."""


class CheckpointReadError(ValueError):
    """A checkpoint file is unreadable (truncated, corrupt, or from another model)."""


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0]


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None, meta: dict) -> Path:
    """Write one checkpoint atomically (``files.atomic_path``): a temp file, fsync, rename over the target, fsync
    of the folder.

    Any failure (or an interrupt) removes the temp file; an OSError or a safetensors write error becomes
    :class:`CheckpointWriteError`, and the checkpoints already in the folder are untouched."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"module.{name}.{k}": v.detach().contiguous().clone()
                   for name, m in modules.items() for k, v in m.state_dict().items()}
        extra = {}
        if optimizer is not None:
            opt_tensors, extra = _optimizer_tensors(optimizer)
            tensors.update(opt_tensors)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps({**meta, **extra})})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(directory)
    except Exception as exc:
        if not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
            raise
        good = list_checkpoints(directory)
        last = good[-1].name if good else "none"
        raise CheckpointWriteError(f"cannot write checkpoint {path.name} in {directory}: {_reason(exc)}; "
                                   f"last good checkpoint: {last}") from exc
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint file; CheckpointReadError when it cannot be read."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["meta"])
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- truncated or corrupt bytes raise many kinds of error
        raise CheckpointReadError(f"unreadable checkpoint {path}: {_reason(exc)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointReadError(f"unreadable checkpoint {path}: no step in its metadata")
    return tensors, meta


def _check_modules(path: Path, modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = f"module.{name}."
        have = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        want = m.state_dict()
        if have.keys() != want.keys():
            missing = sorted(want.keys() - have.keys())[:3]
            raise CheckpointReadError(f"checkpoint {path} does not match module '{name}' "
                                      f"(missing {missing or 'nothing'}, {len(have.keys() - want.keys())} unexpected)")
        for k, v in want.items():
            if have[k].shape != v.shape:
                raise CheckpointReadError(f"checkpoint {path}: {name}.{k} has shape {tuple(have[k].shape)}, "
                                          f"the module {tuple(v.shape)}")


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore modules (and optimizer) in place; return the checkpoint's metadata.

    The file is read and checked against the modules first: a CheckpointReadError leaves everything as it was."""
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    _check_modules(path, modules, tensors)
    if optimizer is not None and "param_groups" not in meta:
        raise CheckpointReadError(f"checkpoint {path} holds no optimizer state")
    for name, m in modules.items():
        prefix = f"module.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None:
        _restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta)
    return meta


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in a folder, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def temp_files(directory: str | Path) -> list[Path]:
    """Orphan temp files of interrupted checkpoint writes in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (TEMP_RE.match(p.name) or p.name.startswith(TEMP_PREFIX)
                                          or _LEGACY_TEMP_RE.match(p.name)))


def clean_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temp files interrupted writes left in ``directory`` (call before any writer starts)."""
    removed = []
    for p in temp_files(directory):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
