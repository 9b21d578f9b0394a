"""Latent shards: images encoded once by the VAE (and captions by the text encoder), in webdataset tars.

``lcm prepare`` turns image shards or an image folder into latent shards; ``lcm distill --data`` streams them
like image shards (``data.shards``), reading only small tensors: no VAE encode per step, and with text states
stored, no text encoder call either. The format (version 1), one tar per input unit, members in this order:

* ``__meta__.json``: {"format": "latentcm-latents", "version": 1, "model": ..., "resolution": R,
  "latent_shape": [C, h, w], "text": "states" | "captions", "dtype": "float16" | "float32",
  "text_shape": [L, D] (states only), "vae_config_hash": H (``latent_format.vae_config_hash``; shards of older
  versions lack it)};
* ``__meta__.uncond.safetensors`` (states only): tensor ``uncond_states`` [1, L, D], the empty prompt;
* per sample ``{key}.latent.safetensors`` (tensor ``latent`` [C, h, w] = VAE posterior mode * scaling factor,
  and with states ``text_states`` [L, D]) and ``{key}.txt``, its caption.

Work splits by unit: an input shard, or ``shard_size`` consecutive images of a sorted folder. Unit i becomes
``{i:06d}.tar`` and ``{i:06d}.json`` (its load report); under W processes process r does the units with
i % W == r. Each tar is written under a temporary name, then renamed, with members of mtime 0, so a unit's bytes
depend on its input and the model only (not on W), and a rerun skips finished units (resume).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ...files import atomic_path, write_json
from .folders import MAX_PIXELS, LoadReport, fit_square, list_pairs
from .latent_format import FORMAT, META_KEY, VERSION, sample_bytes, vae_config_hash
from .shards import _caption, _check, _image_bytes, _samples, expand, is_shard_spec
from .tensors import bundle_text_fns, encode_pairs

TEXT_MODES = ("states", "captions")
# ``accelerate launch --num_processes N`` with N > 1 sets MASTER_ADDR / MASTER_PORT in every launcher, and its
# distributed launchers (torchrun: --multi_gpu, FSDP, DeepSpeed) set WORLD_SIZE; its simple launcher (used on a
# CPU without --multi_gpu) starts one process and sets no WORLD_SIZE. ACCELERATE_MIXED_PRECISION: set by every
# accelerate launch (accelerate 1.16, ``utils/launch.py``).
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class PrepareConfig:
    text: str = "states"          # states: store text encoder states; captions: store only the caption text
    dtype: str = "float16"        # storage dtype of the tensors (training reads them back as fp32)
    shard_size: int = 1000        # images per unit when the input is a folder
    batch_size: int = 64          # encoder batch
    min_size: int = 0             # skip images whose shorter side is smaller

    def __post_init__(self):
        if self.text not in TEXT_MODES:
            raise ValueError(f"--text must be one of {', '.join(TEXT_MODES)}, got {self.text!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shard_size < 1 or self.batch_size < 1 or self.min_size < 0:
            raise ValueError("shard_size and batch_size must be >= 1 and min_size >= 0")


# --- input units ----------------------------------------------------------------------------------------

def units(data: str | Path, shard_size: int) -> tuple[list, LoadReport]:
    """The work units of an input (shard urls, or chunks of (name, path, caption) of a folder sorted by name),
    and what listing a folder skipped (missing captions, files outside it, ...)."""
    if is_shard_spec(str(data)):
        return expand(str(data)), LoadReport()
    folder = Path(data)
    pairs, report = list_pairs(folder)
    if not pairs:
        raise ValueError(f"no image-caption pairs in {folder}: {report.summary()}")
    pairs.sort(key=lambda row: row[0])
    return [pairs[i:i + shard_size] for i in range(0, len(pairs), shard_size)], report


def _unit_pairs(unit, resolution: int, min_size: int, report: LoadReport):
    """(key, image, caption) of one unit, skipping and counting what cannot be used."""
    if isinstance(unit, str):  # a shard url
        def corrupt(message: str) -> None:
            report.skip("unreadable tar (rest of shard)", Path(unit).name)
        for sample in _samples(unit, corrupt):
            reason = _check(sample, min_size)
            name = f"{Path(unit).name}:{sample['__key__']}"
            if reason is not None:
                report.skip(reason, name)
                continue
            try:
                with Image.open(io.BytesIO(_image_bytes(sample))) as im:
                    im.load()
                    image = fit_square(im, resolution)
            except Exception:  # noqa: BLE001 -- header fine but pixels corrupt: counted
                report.skip("unreadable image", name)
                continue
            report.loaded += 1
            yield sample["__key__"].replace("/", "_"), image, _caption(sample)
        return
    for name, path, caption in unit:  # a folder chunk
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError("too many pixels")
                if min(im.size) < min_size:
                    report.skip("image too small", name)
                    continue
                im.load()
                image = fit_square(im, resolution)
        except Exception:  # noqa: BLE001 -- any decoder failure on any bytes: skipped and counted
            report.skip("unreadable image", name)
            continue
        report.loaded += 1
        yield name.rsplit(".", 1)[0].replace("/", "_"), image, caption


# --- writing -------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _meta(bundle, cfg: PrepareConfig, latent_shape, text_shape) -> dict:
    meta = {"format": FORMAT, "version": VERSION, "model": str(bundle.path),
            "resolution": bundle.default_size, "latent_shape": list(latent_shape),
            "text": cfg.text, "dtype": cfg.dtype, "vae_config_hash": vae_config_hash(bundle.vae.config)}
    if cfg.text == "states":
        meta["text_shape"] = list(text_shape)
    return meta


@torch.no_grad()
def prepare_unit(bundle, unit, final: Path, cfg: PrepareConfig) -> LoadReport:
    """Encode one unit into the latent shard ``final`` (atomically) and its report ``final.json``."""
    resolution = bundle.default_size
    report = LoadReport()
    rows = list(_unit_pairs(unit, resolution, cfg.min_size, report))
    with atomic_path(final) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            _write_unit(tar, bundle, rows, cfg)
        # the report first: a finished tar always has one
        write_json(final.with_suffix(".json"), {"loaded": report.loaded,
                                                "skipped": {k: len(v) for k, v in report.skipped.items()}}, indent=1)
    return report


def _write_unit(tar: tarfile.TarFile, bundle, rows: list, cfg: PrepareConfig) -> None:
    """The shard's members: its meta, the empty prompt's states, then each sample's latent and caption."""
    dtype = DTYPES[cfg.dtype]
    data = None
    if rows:
        data = encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, [(im, c) for _, im, c in rows],
                            batch_size=cfg.batch_size, **bundle_text_fns(bundle))
        meta = _meta(bundle, cfg, data.latents.shape[1:], data.text_states.shape[1:])
    else:
        meta = _meta(bundle, cfg, [], [])
    _add(tar, f"{META_KEY}.json", json.dumps(meta).encode())
    if cfg.text == "states" and data is not None:
        _add(tar, f"{META_KEY}.uncond.safetensors", sample_bytes({"uncond_states": data.uncond_states.to(dtype)}))
    for i, (key, _, caption) in enumerate(rows):
        tensors = {"latent": data.latents[i].to(dtype)}
        if cfg.text == "states":
            tensors["text_states"] = data.text_states[i].to(dtype)
        _add(tar, f"{key}.latent.safetensors", sample_bytes(tensors))
        _add(tar, f"{key}.txt", caption.encode())


def prepare(bundle, data: str | Path, out: Path, cfg: PrepareConfig, *, process_index: int = 0,
            num_processes: int = 1, progress=None) -> dict:
    """Prepare this process's units of ``data`` into ``out``; returns {"done", "skipped_existing", "units"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo, listing = units(data, cfg.shard_size)
    if process_index == 0:  # what the folder listing skipped, counted once in the summary
        write_json(out / "listing.json", {"skipped": {k: len(v) for k, v in listing.skipped.items()}}, indent=1)
    mine = [i for i in range(len(todo)) if i % num_processes == process_index]
    for stale in [*out.glob("*.tmp"), *out.glob("*.tmp[0-9]*.*")]:  # a killed run's partial files (this process's)
        if _unit_index(stale) in mine:
            stale.unlink()
    done = existing = 0
    for i in mine:
        final = out / f"{i:06d}.tar"
        if final.is_file() and final.with_suffix(".json").is_file():
            existing += 1
        else:
            prepare_unit(bundle, todo[i], final, cfg)
            done += 1
        if progress is not None:
            progress(1)
    return {"done": done, "skipped_existing": existing, "units": len(todo)}


def launch_warning(env, running: int) -> str | None:
    """One line when ``accelerate launch`` asked for another number of processes than ``running`` (the processes
    this run has), else None. ``env``: the environment (``os.environ``)."""
    asked = env.get("WORLD_SIZE", "")
    if asked.isdigit() and int(asked) != running:
        return f"warning: accelerate launch asked for {asked} processes but {running} run"
    if not asked and running == 1 and "ACCELERATE_MIXED_PRECISION" in env and "MASTER_PORT" in env:
        return ("warning: accelerate launch was asked for several processes but started one (on a CPU it needs "
                "--multi_gpu: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ...)")
    return None


def _unit_index(path: Path) -> int | None:
    stem = path.name.split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def summarize(out: Path, num_units: int) -> dict:
    """Totals over the unit reports in ``out``, written to ``out/prepare.json``; missing units listed."""
    out = Path(out)
    loaded, missing = 0, []
    listing = out / "listing.json"
    skipped = dict(json.loads(listing.read_text())["skipped"]) if listing.is_file() else {}
    for i in range(num_units):
        report = out / f"{i:06d}.json"
        if not (out / f"{i:06d}.tar").is_file() or not report.is_file():
            missing.append(i)
            continue
        row = json.loads(report.read_text())
        loaded += row["loaded"]
        for k, v in row["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    summary = {"shards": num_units, "loaded": loaded, "skipped": skipped, "missing_units": missing,
               "spec": str(out / ("{%06d..%06d}.tar" % (0, num_units - 1)) if num_units > 1 else out / "000000.tar")}
    write_json(out / "prepare.json", summary, indent=1)
    return summary


def discard(out: Path, num_units: int) -> None:
    """Remove the units' shards and reports and the summary: a run that loaded nothing leaves no finished unit."""
    out = Path(out)
    for i in range(num_units):
        for suffix in (".tar", ".json"):
            (out / f"{i:06d}{suffix}").unlink(missing_ok=True)
    for name in ("prepare.json", "listing.json"):
        (out / name).unlink(missing_ok=True)
    try:
        out.rmdir()  # only when nothing else is in it
    except OSError:
        pass
