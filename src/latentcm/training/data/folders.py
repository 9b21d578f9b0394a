"""User image-caption folders: the Hugging Face imagefolder convention or sidecar .txt captions.

``load_pairs(folder, resolution)`` returns (image, caption) pairs resized (shorter side) and
centre-cropped to ``resolution``, plus a ``LoadReport``. Nothing bad stops the load and nothing is
lost silently: an unreadable or corrupt image, a missing caption, a bad metadata line, a listed
file that does not exist, a metadata ``file_name`` outside the folder (absolute or with ``..``) and a
symlink whose target lies outside the folder are skipped, counted by reason and named in the report.
Nothing outside the folder is ever read. Every image mode (16-bit, float, CMYK, transparency, ...)
becomes 8-bit RGB through ``images.to_rgb`` (transparency on white).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from ...images import to_rgb
from .tensors import LCDData, bundle_text_fns, encode_pairs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption")
MAX_PIXELS = 64_000_000  # refuse decompression bombs rather than exhausting memory


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        """One line, e.g. 'loaded 98 image-caption pairs; skipped 2 (unreadable image: 1, missing caption: 1)'."""
        parts = ", ".join(f"{reason}: {len(names)}" for reason, names in sorted(self.skipped.items()))
        return f"loaded {self.loaded} image-caption pairs; skipped {self.num_skipped}" + (f" ({parts})" if parts else "")


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic), then centre-crop to a square."""
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _read_image(path: Path, resolution: int) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return None
            im.load()
            return fit_square(im, resolution)
    except Exception:  # noqa: BLE001 -- any decoder failure on any bytes: skipped and counted, never a crash
        return None


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies inside the resolved ``root``."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except (OSError, ValueError):
        return False


def _list_files(folder: Path, report: LoadReport) -> dict[str, Path]:
    """Image files under ``folder`` by their folder-relative posix name. A symlink (file or directory) whose
    target lies outside the folder is skipped with reason 'symlink outside the folder'; a directory
    reached twice (a symlink loop) is walked once."""
    root = Path(os.path.realpath(folder))
    names: dict[str, Path] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            sub = Path(dirpath) / d
            if _inside(sub, root):
                keep.append(d)
            else:
                report.skip("symlink outside the folder", sub.relative_to(folder).as_posix() + "/")
        dirnames[:] = keep
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            name = path.relative_to(folder).as_posix()
            if not _inside(path, root):
                report.skip("symlink outside the folder", name)
            elif path.is_file():
                names[name] = path
    return dict(sorted(names.items(), key=lambda item: PurePosixPath(item[0]).parts))  # as sorted Paths


def _listed_name(name: str) -> str | None:
    """A metadata ``file_name`` as a folder-relative posix name; None when it points outside the folder."""
    if posixpath.isabs(name):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def _read_caption(path: Path, root: Path, name: str, report: LoadReport) -> str | None:
    """The sidecar caption ``<image>.txt`` when it is a file inside the folder, else None."""
    if not path.is_file():
        return None
    if not _inside(path, root):
        report.skip("symlink outside the folder", name)
        return None
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _metadata_captions(folder: Path, report: LoadReport) -> dict[str, str]:
    captions = {}
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return captions
    if not _inside(meta, Path(os.path.realpath(folder))):
        report.skip("symlink outside the folder", "metadata.jsonl")
        return captions
    for n, line in enumerate(meta.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            report.skip("bad metadata line", f"metadata.jsonl:{n}")
            continue
        if not isinstance(row, dict) or not isinstance(name, str) or posixpath.normpath(name or ".") == "." \
                or "\x00" in name:
            report.skip("bad metadata line", f"metadata.jsonl:{n}")
            continue
        listed = _listed_name(name)
        if listed is None:
            report.skip("file_name outside the folder", f"metadata.jsonl:{n}")
            continue
        text = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), "")
        captions[listed] = text
    return captions


def list_pairs(folder: str | Path) -> tuple[list[tuple[str, Path, str]], LoadReport]:
    """(name, image path, caption) of ``folder``, sorted, no pixel read; captions from metadata.jsonl, else ``<image>.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    report = LoadReport()
    captions = _metadata_captions(folder, report)
    names = _list_files(folder, report)
    outside = set(report.skipped.get("symlink outside the folder", []))
    for listed in sorted(set(captions) - set(names) - outside):
        report.skip("listed file missing", listed)
    root = Path(os.path.realpath(folder))
    pairs = []
    for name, path in names.items():
        text = captions.get(name)
        if text is None:
            text = _read_caption(path.with_suffix(".txt"), root, path.with_suffix(".txt").relative_to(folder).as_posix(),
                                 report)
        text = (text or "").strip()
        if not text:
            report.skip("missing caption", name)
            continue
        pairs.append((name, path, text))
    return pairs, report


def load_pairs(folder: str | Path, resolution: int) -> tuple[list[tuple[Image.Image, str]], LoadReport]:
    """(image, caption) pairs of ``folder`` (``list_pairs``), each image read and fitted to ``resolution``."""
    listed, report = list_pairs(folder)
    pairs = []
    for name, path, text in listed:
        image = _read_image(path, resolution)
        if image is None:
            report.skip("unreadable image", name)
            continue
        pairs.append((image, text))
    report.loaded = len(pairs)
    return pairs, report


def folder_data(bundle, folder: Path, cache: Path | None, write: bool = True) -> tuple[LCDData, LoadReport, list[str]]:
    """Encode a user folder once (latents and caption states; reused while the folder is unchanged).
    Returns the data, the load report and the captions."""
    resolution = bundle.default_size
    pairs, report = load_pairs(folder, resolution)
    if not pairs:
        raise ValueError(f"no usable image-caption pairs in {folder}: {report.summary()}")
    digest = hashlib.sha256()
    for image, text in pairs:
        digest.update(image.tobytes())
        digest.update(text.encode())
    meta = {"folder": str(folder), "pairs": digest.hexdigest()[:16], "model": str(bundle.path)}
    found = LCDData.load(cache, meta) if cache is not None else None
    if found is None:
        found = encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, pairs, **bundle_text_fns(bundle))
        if cache is not None and write:
            found.save(cache, meta)
    return found, report, [text for _, text in pairs]
