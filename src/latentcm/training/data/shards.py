"""Webdataset tar shards of images and captions, streamed and encoded on the fly (data at any scale).

A spec is a brace pattern (``shards/{000000..000009}.tar``), a local ``.tar`` path, or a ``pipe:CMD`` that
writes a tar to stdout (braces expand there too: one command per shard); several specs may be joined with ``::``. A sample is the group of consecutive tar
members sharing a key (the member name up to its first dot): an image (``.png``/``.jpg``/``.jpeg``/``.webp``)
and a caption (``.txt``, ``.caption``, ``.text``, or ``text``/``caption`` in ``.json``). Latent shards
(``data.prepare``, ``lcm prepare``) stream the same way: their ``__meta__`` sample fixes the format, and each
sample's ``latent.safetensors`` replaces the image (no VAE encode; with stored text states no text encoder).

Order (a pure function of the seed; what makes resume exact):

* the stream of a process is epoch 0, 1, 2, ... concatenated; in epoch e its shards are read in an order
  shuffled by (seed, e), and each shard's samples pass a shuffle buffer of ``shuffle_buffer`` raw samples
  seeded by (seed, e, shard);
* local batch j is usable samples [j B, (j + 1) B) of that stream (B = batch size); batches straddle epochs;
* under W processes, process r reads only shards i with i % W == r and its loop batch index k = step W + r
  maps to local batch k // W. Every process needs at least one shard.
* ``batch(k)`` continues from the current position, or restarts at epoch 0 when k lies behind it; skipping
  forward reads tar members but decodes no image (a sample is usable when it has a caption and an image whose
  header PIL reads and that is at least ``min_size`` pixels on its shorter side).

Memory holds at most ``shuffle_buffer`` raw samples plus one batch, whatever the dataset's size. Bad samples
(corrupt image, missing caption, too small) are skipped and counted in a ``folders.LoadReport``, and so is
the rest of a shard whose tar turns unreadable part-way (truncated, bad header); a missing
local shard, a failing ``pipe:`` command or data with no usable sample is a one-line error.
"""
from __future__ import annotations

import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

import torch
from PIL import Image

from ...models.components import encode_text
from .folders import MAX_PIXELS, LoadReport, fit_square
from .latent_format import META_KEY, check_model, is_latent_sample, read_meta, read_tensors
from .tensors import LCDData, bundle_text_fns, encode_pairs

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CAPTION_EXTS = ("txt", "caption", "text")


def is_shard_spec(spec: str) -> bool:
    """True for a webdataset spec (brace pattern, .tar path, pipe: command), False for an image folder."""
    s = str(spec)
    return s.startswith("pipe:") or "{" in s or any(p.endswith((".tar", ".tar.gz", ".tgz")) for p in s.split("::"))


def expand(spec: str) -> list[str]:
    """The shard urls of a spec (braceexpand, as webdataset); a missing local shard is a FileNotFoundError."""
    from braceexpand import braceexpand

    urls = [u for part in str(spec).split("::") for u in braceexpand(part)]  # pipe: commands too, as webdataset
    for u in urls:
        if not u.startswith("pipe:") and not Path(u).is_file():
            raise FileNotFoundError(f"shard {u} does not exist (--data {spec})")
    if not urls:
        raise ValueError(f"--data {spec} names no shards")
    return urls


def _read_members(url: str, on_corrupt=None):
    """(member name, bytes) of a tar shard, streamed; a failing pipe: command is a ValueError. A tar that turns
    unreadable part-way (truncated, corrupt header) ends there: ``on_corrupt(message)`` is called, or, without
    one, it is a ValueError."""
    proc = None
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        fh = proc.stdout
    else:
        fh = open(url, "rb")
    try:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for m in tar:
                    if m.isfile():
                        yield m.name, tar.extractfile(m).read()
        except (tarfile.ReadError, EOFError, OSError) as exc:
            if proc is None or proc.wait() == 0:
                if on_corrupt is None:
                    raise ValueError(f"shard {url} is not a readable tar: {exc}") from None
                on_corrupt(str(exc))
        if proc is not None and proc.wait() != 0:
            raise ValueError(f"shard command {url!r} failed (exit {proc.returncode})")
    finally:
        fh.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _samples(url: str, on_corrupt=None):
    """Raw samples {"__key__": key, ext: bytes} of one shard: consecutive members grouped by key."""
    current: dict | None = None
    for name, data in _read_members(url, on_corrupt):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            continue
        prefix = name[: len(name) - len(base)]
        key, ext = base.split(".", 1)
        key = prefix + key
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext.lower()] = data
    if current is not None:
        yield current


def _caption(sample: dict) -> str:
    for ext in CAPTION_EXTS:
        if ext in sample:
            return sample[ext].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            row = json.loads(sample["json"])
            text = next((row[k] for k in ("text", "caption") if isinstance(row.get(k), str)), "")
            return text.strip()
        except (ValueError, AttributeError, RecursionError):
            return ""
    return ""


def _image_bytes(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)


def _check(sample: dict, min_size: int) -> str | None:
    """The skip reason of a raw sample, None when usable; reads the image header only, decodes no pixels."""
    if is_latent_sample(sample):  # a latent shard's sample (``data.prepare``): decoded per batch
        return None if _caption(sample) else "missing caption"
    data = _image_bytes(sample)
    if data is None:
        return "missing image"
    if not _caption(sample):
        return "missing caption"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            im.verify()
    except Exception:  # noqa: BLE001 -- any decoder failure on any bytes: skipped and counted
        return "unreadable image"
    if w * h > MAX_PIXELS:
        return "unreadable image"
    if min(w, h) < min_size:
        return "image too small"
    return None


class ShardSource:
    """A streaming LCD data source over webdataset shards (see the module docstring for the order).

    ``batch(k)`` returns an :class:`LCDData` of the next ``batch_size`` samples, encoded with the model's VAE
    (posterior mode * scaling_factor) and text encoder; ``uncond_states`` is the empty prompt.
    """

    streaming = True

    def __init__(self, bundle, spec: str, batch_size: int, seed: int = 0, *, process_index: int = 0,
                 num_processes: int = 1, shuffle_buffer: int = 64, min_size: int = 0,
                 proportion_empty_prompts: float = 0.0):
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"--proportion-empty-prompts must be in [0, 1], got {proportion_empty_prompts}")
        self.spec, self.bundle, self.batch_size, self.seed = str(spec), bundle, batch_size, seed
        self.shuffle_buffer, self.min_size, self.p_empty = max(1, shuffle_buffer), min_size, proportion_empty_prompts
        self.rank, self.world = process_index, num_processes
        urls = expand(spec)
        self.urls = [u for i, u in enumerate(urls) if i % num_processes == process_index]
        if not self.urls:
            raise ValueError(f"--data {spec} has {len(urls)} shards, fewer than the {num_processes} processes")
        self.resolution = bundle.default_size
        self.report = LoadReport()
        self._shard_skips: dict[str, dict[str, list[str]]] = {}  # per finished shard, counted once
        self._shard_loaded: dict[str, int] = {}
        self._late: dict[str, str] = {}  # passed the header check, failed to decode
        self.peak_buffered = 0
        self.meta: dict | None = None  # latent shards: their __meta__ (``data.prepare``); None for image shards
        self._restart()
        self.latent_shape = self._peek_first()  # [C, h, w]
        with torch.no_grad():
            self.uncond_states = self._encode_uncond()

    @property
    def needs_encoders(self) -> bool:
        """False for latent shards with stored text states: the VAE and text encoder are never called."""
        return self.meta is None or self.meta["text"] != "states"

    # --- what LCDTask reads (``streaming``, ``batch``, ``uncond_states``, ``to``) -----------------
    def to(self, device) -> "ShardSource":
        """The empty-prompt states and the encoders on ``device`` (batches are encoded there, returned on CPU)."""
        self.uncond_states = self.uncond_states.to(device)
        names = ("vae", "text_encoder", "text_encoder_2") if self.meta is None else ("text_encoder", "text_encoder_2")
        for name in names if self.needs_encoders else ():  # latent shards: the encoders stay off the device
            module = getattr(self.bundle, name, None)
            if module is not None:
                module.to(device)
        return self

    def __len__(self) -> int:
        """Usable samples of the shards read to their end so far (the dataset's size is not known up front)."""
        return sum(self._shard_loaded.values())

    # --- the stream ----------------------------------------------------------------------------
    def _restart(self) -> None:
        self._it = self._stream()
        self.position = 0  # usable samples consumed

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order

    def _shard_stream(self, epoch: int, i: int):
        """Usable raw samples of shard i in epoch ``epoch`` through its seeded shuffle buffer."""
        url = self.urls[i]
        rng = random.Random(f"buffer-{self.seed}-{epoch}-{i}")
        skips: dict[str, list[str]] = {}
        loaded, buf = 0, []

        def corrupt(message: str) -> None:  # the rest of the shard is lost: counted, the run goes on
            skips.setdefault("unreadable tar (rest of shard)", []).append(Path(url).name)

        for sample in _samples(url, corrupt):
            if sample["__key__"].rsplit("/", 1)[-1] == META_KEY:
                self._note_meta(sample, url)
                continue
            reason = _check(sample, self.min_size)
            if reason is not None:
                skips.setdefault(reason, []).append(f"{Path(url).name}:{sample['__key__']}")
                continue
            loaded += 1
            sample["__url__"] = url
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
            else:
                j = rng.randrange(len(buf))
                buf[j], sample = sample, buf[j]
                yield sample
            self.peak_buffered = max(self.peak_buffered, len(buf))
        rng.shuffle(buf)
        while buf:
            yield buf.pop()
        if url not in self._shard_loaded:
            self._shard_loaded[url], self._shard_skips[url] = loaded, skips
            self._update_report()

    def _stream(self):
        epoch = 0
        while True:
            before = self.position
            for i in self._order(epoch):
                for sample in self._shard_stream(epoch, i):
                    yield epoch, sample
            if self.position == before:
                raise ValueError(f"no usable image-caption pairs in {self.spec}: {self.report.summary()}")
            epoch += 1

    def _note_meta(self, sample: dict, url: str) -> None:
        """A latent shard's __meta__: the first one fixes the format; every later one must agree with it."""
        meta = read_meta(sample)
        if not meta["latent_shape"]:  # a shard that `lcm prepare` found no usable image for: nothing to agree on
            return
        if self.meta is None:
            check_model(meta, self.bundle, url)
            self.meta = meta
            return
        keys = ("latent_shape", "text", "text_shape", "resolution")
        if any(meta.get(k) != self.meta.get(k) for k in keys):
            raise ValueError(f"latent shard {url} differs from the first one in {', '.join(keys)}: "
                             f"{[meta.get(k) for k in keys]} vs {[self.meta.get(k) for k in keys]}")

    def _update_report(self) -> None:
        report = LoadReport(loaded=sum(self._shard_loaded.values()) - len(self._late))
        for skips in self._shard_skips.values():
            for reason, names in skips.items():
                report.skipped.setdefault(reason, []).extend(names)
        for name, reason in self._late.items():
            report.skip(reason, name)
        self.report.loaded, self.report.skipped = report.loaded, report.skipped

    def _next(self):
        epoch, sample = next(self._it)
        self.position += 1
        return epoch, self.position - 1, sample

    def _peek_first(self) -> tuple[int, ...]:
        """Fail early (no usable sample, bad pipe) and learn the latent shape from one encoded sample."""
        _, _, first = self._next()
        self._restart()
        if is_latent_sample(first):
            if self.meta is None:
                raise ValueError(f"{self.spec}: latent samples without a __meta__ member (not made by `lcm prepare`)")
            return tuple(self.meta["latent_shape"])
        blank = Image.new("RGB", (self.resolution, self.resolution))
        return tuple(self._encode([(blank, "")]).latents.shape[1:])

    def samples(self, j: int) -> list[tuple[int, int, dict]]:
        """(epoch, stream position, raw sample) of local batch j, fast-forwarding without decoding images."""
        start = j * self.batch_size
        if start < self.position:
            self._restart()
        while self.position < start:
            self._next()
        return [self._next() for _ in range(self.batch_size)]

    def batch(self, k: int) -> LCDData:
        """Loop batch index k (= step W + r under W processes): local batch k // W, encoded."""
        if k % self.world != self.rank:
            raise ValueError(f"batch index {k} does not belong to process {self.rank} of {self.world}")
        if self.meta is not None:
            return self._latent_batch(k)
        pairs = []
        for epoch, pos, sample in self.samples(k // self.world):
            name = f"{Path(sample['__url__']).name}:{sample['__key__']}"
            try:
                with Image.open(io.BytesIO(_image_bytes(sample))) as im:
                    im.load()
                    image = fit_square(im, self.resolution)
            except Exception:  # noqa: BLE001 -- header fine but pixels corrupt: dropped from this batch, counted
                self._late[name] = "unreadable image"
                self._update_report()
                continue
            caption = "" if self._dropped(pos) else _caption(sample)  # caption dropout
            pairs.append((image, caption))
        if not pairs:
            raise ValueError(f"batch {k} of {self.spec} has no decodable image: {self.report.summary()}")
        return self._encode(pairs)

    def _dropped(self, pos: int) -> bool:
        """Caption dropout (--proportion-empty-prompts), deterministic per stream position."""
        return bool(self.p_empty) and random.Random(f"empty-{self.seed}-{pos}").random() < self.p_empty

    @torch.no_grad()
    def _latent_batch(self, k: int) -> LCDData:
        """A batch of latent shards: stored latents, and stored text states or captions encoded now."""
        latents, states, captions = [], [], []
        for epoch, pos, sample in self.samples(k // self.world):
            try:
                tensors = read_tensors(sample["latent.safetensors"])
                latent = tensors["latent"].float()
                if tuple(latent.shape) != self.latent_shape:
                    raise ValueError("latent shape")
                state = tensors["text_states"].float() if self.meta["text"] == "states" else None
            except (ValueError, KeyError):
                self._late[f"{Path(sample['__url__']).name}:{sample['__key__']}"] = "unreadable latent"
                self._update_report()
                continue
            dropped = self._dropped(pos)
            latents.append(latent)
            captions.append("" if dropped else _caption(sample))
            if state is not None:
                states.append(self.uncond_states[0].cpu() if dropped else state)
        if not latents:
            raise ValueError(f"batch {k} of {self.spec} has no readable latent: {self.report.summary()}")
        if not states:
            b = self.bundle
            states = list(bundle_text_fns(b).get("text_fn", lambda c: encode_text(b.text_encoder, b.tokenizer, c))(
                captions).float().cpu())
        return LCDData(torch.stack(latents), torch.stack(states), self.uncond_states.cpu())

    @torch.no_grad()
    def _encode(self, pairs) -> LCDData:
        b = self.bundle
        return encode_pairs(b.vae, b.text_encoder, b.tokenizer, pairs, batch_size=len(pairs), **bundle_text_fns(b))

    def _encode_uncond(self) -> torch.Tensor:
        if self.meta is not None and self.meta["text"] == "states":
            return self.meta["uncond_states"]  # [1, L, D] stored by `lcm prepare`
        b = self.bundle
        fns = bundle_text_fns(b)
        if "uncond_fn" in fns:
            return fns["uncond_fn"]().float().cpu()
        return encode_text(b.text_encoder, b.tokenizer, [""]).float().cpu()
