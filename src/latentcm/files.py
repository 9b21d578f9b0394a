"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, move it onto ``path``.

    The temporary keeps ``path``'s suffix (``x.tmp.safetensors``), so writers that pick a format by suffix
    still work; on an error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (a trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")
