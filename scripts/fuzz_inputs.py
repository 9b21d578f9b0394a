"""Property-based fuzz (hypothesis) of every input surface of latentcm; writes the counts as JSON.

Surfaces and the property each must keep:

  cli     ``lcm ...`` option parsing of every command and group, with random option names, values (numbers out
          of range, NaN / Inf, random text, option-like tokens) and stray arguments: exit code 0 or 2 and, on
          2, exactly one stderr line ``lcm: error: ...``; never a traceback. Every command's callback is
          replaced by a no-op while it runs: parse level only, nothing trains or loads.
  folder  ``load_pairs`` on image folders of random files: random bytes, valid images of every PIL mode in
          several formats, truncated and bit-flipped images, sidecar captions, metadata.jsonl with random
          JSON lines and file_name values that are absolute or climb out with ``..``, and symlinks out of the
          folder: no exception, every pair a RESxRES RGB image with a caption, and no file outside the folder
          is ever opened (checked by an audit hook on ``open``).
  model   ``Bundle.load`` on a copy of the micro teacher with 1-3 random mutations (random bytes, truncation,
          flipped bytes, a random value in a JSON config, a deleted file, pickle instead of safetensors):
          loads, or raises ModelError (one CLI line).
  lora    ``lcm generate --lora FILE`` on the micro teacher with a random LoRA file or folder (random bytes,
          random safetensors keys and shapes, a pickle .bin): exit 0 or 2 with one line, never a traceback.

    nice -n 10 .venv/bin/python scripts/fuzz_inputs.py --out reports/reliability/fuzz.json

tests/test_fuzz.py runs the same properties with a few examples each.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import click
import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RES = 8
SECRET = "SECRET-CAPTION"
NAN_WORDS = ["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1e309", "-1e309", "1e-400"]
ODD_WORDS = ["", " ", "0", "-0", "-1", "1", "0x10", "1_000", "\u0663", "1,2", "1,2,x", "..", "../..", "/", "/etc/passwd",
             "--", "-", "-h", "--help", "--version", "a\nb", "\x00", "é", "9" * 40, "-" + "9" * 40, "true", "None"]


# --- cli ------------------------------------------------------------------------------------------------

def _commands(group=None, path=()):
    from latentcm.cli import cli

    group = cli if group is None else group
    yield path, group
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


@contextlib.contextmanager
def parse_only():
    """Replace every command's callback by a no-op (restored on exit): parsing runs, nothing else."""
    saved = [(cmd, cmd.callback) for _, cmd in _commands() if not isinstance(cmd, click.Group)]
    try:
        for cmd, _ in saved:
            cmd.callback = lambda **kw: None
        yield
    finally:
        for cmd, callback in saved:
            cmd.callback = callback


def _value(param) -> st.SearchStrategy[str]:
    """Option values: valid ones of the option's type, numbers around its range, NaN / Inf, odd and random text."""
    t = param.type
    typed = []
    if isinstance(t, click.Choice):
        typed.append(st.sampled_from(list(t.choices)))
    if isinstance(t, click.types.IntParamType):
        lo = getattr(t, "min", None) if getattr(t, "min", None) is not None else -10
        hi = getattr(t, "max", None) if getattr(t, "max", None) is not None else 10**6
        typed.append(st.integers(lo - 3, hi + 3).map(str))
        typed.append(st.sampled_from([lo, hi, lo - 1, hi + 1]).map(str))
    if isinstance(t, click.types.FloatParamType):
        typed.append(st.floats(allow_nan=True, allow_infinity=True).map(repr))
        typed.append(st.floats(-100, 100).map(str))
    return st.one_of(*typed, st.sampled_from(NAN_WORDS + ODD_WORDS), st.text(max_size=12),
                     st.integers(-2**70, 2**70).map(str))


@st.composite
def cli_case(draw) -> list[str]:
    path, cmd = draw(st.sampled_from(list(_commands())))
    params = [p for p in cmd.params if isinstance(p, click.Option)]
    tokens: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["option"] * 4 + ["option="] + ["argument", "junk"]))
        if kind.startswith("option") and params:
            p = draw(st.sampled_from(params))
            name = draw(st.sampled_from(p.opts + p.secondary_opts))
            if p.is_flag:
                tokens.append(name)
            elif kind == "option=" and name.startswith("--"):
                tokens.append(f"{name}={draw(_value(p))}")
            else:
                tokens += [name, draw(_value(p))]
        elif kind == "argument":
            tokens.append(draw(st.one_of(st.text(max_size=16), st.sampled_from(ODD_WORDS))))
        else:
            tokens.append(draw(st.sampled_from(["--no-such-option", "-z", "--out", "--lora", "--=", "---x", "-"])))
    return [*path, *tokens]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lcm ARGV`` (exceptions other than SystemExit propagate)."""
    from latentcm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def check_one_line(code: int, err: str, where: str) -> str:
    assert "Traceback" not in err, f"{where}: traceback\n{err}"
    assert code in (0, 2), f"{where}: exit code {code}\n{err}"
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lcm: error: "), f"{where}: not one error line: {err!r}"
    return f"exit {code}"


def check_cli(argv: list[str], ctx=None) -> str:
    code, _, err = run_cli(argv)
    return check_one_line(code, err, f"lcm {argv!r}")


# --- image folders ------------------------------------------------------------------------------------------

MODES = ["1", "L", "P", "PA", "LA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]
FORMATS = ["PNG", "BMP", "TIFF", "JPEG", "WEBP", "GIF", "PPM"]
SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".txt", ""]

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)


def image_bytes(mode: str, size: tuple[int, int], fmt: str, pixel_seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(pixel_seed)
    w, h = size
    im = Image.new(mode, size)
    if mode in ("I", "I;16"):
        im = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16 if mode == "I;16" else np.int32))
    elif mode == "F":
        im = Image.fromarray(rng.normal(0.5, 1.0, (h, w)).astype(np.float32))
    else:
        im.frombytes(rng.integers(0, 256, len(im.tobytes()), dtype=np.uint8).tobytes())
        if mode == "P" and rng.random() < 0.5:
            im.info["transparency"] = int(rng.integers(0, 256))
    buf = io.BytesIO()
    try:
        im.save(buf, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, fmt)
    return buf.getvalue()


@st.composite
def file_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "valid", "valid", "truncated", "flipped"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = image_bytes(draw(st.sampled_from(MODES)), (draw(st.integers(1, 12)), draw(st.integers(1, 12))),
                       draw(st.sampled_from(FORMATS)), draw(st.integers(0, 2**16)))
    if kind == "truncated":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flipped":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return bytes(buf)
    return data


names = st.tuples(st.sampled_from(["", "sub/", "a/b/", ".hidden/", "sp ace/"]),
                  st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=8),
                  st.sampled_from(SUFFIXES)).map(lambda t: t[0] + t[1] + t[2])


@st.composite
def folder_case(draw) -> dict:
    files = draw(st.dictionaries(names, file_bytes(), max_size=5))
    odd = ["../outside/secret.png", "@ABS@/secret.png", "a/../../outside/secret.png", "..", ".", "./x.png",
           "sub/../x.png", "", "x\x00.png", "link.png", "linkdir/s.png", "inside.png"]
    file_name = st.one_of(*([st.sampled_from(list(files))] * 3 if files else []), st.sampled_from(odd),
                          st.text(max_size=10), json_values)
    caption = st.one_of(st.text(max_size=20), st.text(max_size=20), json_values)
    row = st.fixed_dictionaries({"file_name": file_name}, optional={"text": caption, "caption": caption,
                                                                    "extra": json_values})
    line = st.one_of(row.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30),
                     st.sampled_from(["{", "[]", "null", '{"file_name": 1}', "\ufeff{}", '{"file_name": "a"}' * 2]))
    metadata = draw(st.one_of(st.none(), st.lists(line, max_size=6)))
    sidecar = st.one_of(st.text(min_size=1, max_size=20), st.text(max_size=20), st.binary(max_size=20),
                        st.just("@SECRET@"))
    sidecars = {name: draw(sidecar) for name in [*files, "inside.png", "link.png"] if draw(st.booleans())}
    links = draw(st.lists(st.sampled_from(["link.png", "linkdir", "loop", "inside.png", "metadata.jsonl"]),
                          max_size=3, unique=True))
    return {"files": files, "metadata": metadata, "sidecars": sidecars, "links": links}


_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def _materialize(case: dict, root: Path) -> Path:
    from PIL import Image

    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(outside / "secret.png")
    Image.new("RGB", (4, 4), (255, 0, 0)).save(outside / "dir" / "s.png")
    (outside / "secret.txt").write_text(SECRET)
    (outside / "dir" / "s.txt").write_text(SECRET)
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "link.png", "text": SECRET}) + "\n")
    folder = root / "data"
    folder.mkdir()
    for name, data in case["files"].items():
        path = folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:  # a name that collides with a folder of another name
            pass
    for name, text in case["sidecars"].items():
        path = (folder / name).with_suffix(".txt")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if text == "@SECRET@":
                path.unlink(missing_ok=True)
                os.symlink(outside / "secret.txt", path)
            else:
                path.write_bytes(text if isinstance(text, bytes) else text.encode())
        except (OSError, ValueError):
            pass
    if case["metadata"] is not None:
        (folder / "metadata.jsonl").write_text(
            "\n".join(line.replace("@ABS@", str(outside)) for line in case["metadata"]) + "\n")
    targets = {"link.png": outside / "secret.png", "linkdir": outside / "dir", "loop": folder,
               "inside.png": next(iter(sorted(folder.rglob("*.png"))), folder / "none.png"),
               "metadata.jsonl": outside / "metadata.jsonl"}
    for name in case["links"]:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            os.symlink(targets[name], path)
    return folder


def check_folder(case: dict, ctx) -> str:
    global _OPENED
    from latentcm.training.data.folders import load_pairs

    root = Path(tempfile.mkdtemp(dir=ctx["tmp"]))
    try:
        folder = _materialize(case, root)
        outside = os.path.realpath(root / "outside")
        _OPENED = []
        try:
            pairs, report = load_pairs(folder, RES)
        finally:
            opened, _OPENED = _OPENED, None
        leaked = [p for p in opened if os.path.realpath(p).startswith(outside + os.sep)]
        assert not leaked, f"read outside the folder: {leaked}"
        assert report.loaded == len(pairs)
        for image, text in pairs:
            assert image.mode == "RGB" and image.size == (RES, RES), (image.mode, image.size)
            assert isinstance(text, str) and text.strip() and SECRET not in text
        return f"{len(pairs)} loaded, {report.num_skipped} skipped"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- model and LoRA folders -------------------------------------------------------------------------------

def build_teacher(dest: Path) -> Path:
    from latentcm.models.components import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(dest, safe_serialization=True)
    return dest


@st.composite
def model_case(draw) -> list[tuple]:
    ops = st.tuples(st.integers(0, 10**6), st.sampled_from(["bytes", "truncate", "flip", "json", "json", "delete",
                                                            "pickle", "empty"]),
                    st.binary(max_size=64), json_values, st.integers(0, 10**6))
    return draw(st.lists(ops, min_size=1, max_size=3))


def _mutate(folder: Path, ops: list[tuple]) -> None:
    import torch
    from safetensors.torch import load_file

    for index, op, data, value, where in ops:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            return
        path = files[index % len(files)]
        raw = path.read_bytes()
        if op == "bytes":
            path.write_bytes(data)
        elif op == "truncate":
            path.write_bytes(raw[:where % max(1, len(raw))])
        elif op == "flip" and raw:
            buf = bytearray(raw)
            buf[where % len(buf)] ^= 1 + where % 255
            path.write_bytes(bytes(buf))
        elif op == "json":
            try:
                found = json.loads(raw)
            except ValueError:
                found = None
            if isinstance(found, dict) and found:
                found[sorted(found)[where % len(found)]] = value
            else:
                found = value
            path.write_text(json.dumps(found))
        elif op == "delete":
            path.unlink()
        elif op == "pickle" and path.suffix == ".safetensors":
            try:
                torch.save(load_file(str(path)), path.with_suffix(".bin"))
            except Exception:  # noqa: BLE001 -- an earlier mutation broke it
                path.with_suffix(".bin").write_bytes(data)
            path.unlink()
        elif op == "empty":
            path.write_bytes(b"")


def check_model(ops: list[tuple], ctx) -> str:
    from latentcm.bundle import Bundle
    from latentcm.errors import ModelError

    folder = Path(tempfile.mkdtemp(dir=ctx["tmp"])) / "model"
    try:
        shutil.copytree(ctx["teacher"], folder)
        _mutate(folder, ops)
        try:
            Bundle.load(folder)
        except ModelError as exc:
            assert str(exc).strip(), "empty message"
            return "refused (ModelError)"
        return "loaded"
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


LORA_KEYS = ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "foo.lora.bar", "not_a_lora"]


@st.composite
def lora_case(draw) -> dict:
    kind = draw(st.sampled_from(["bytes", "tensors", "tensors", "pickle", "folder", "missing"]))
    keys = draw(st.lists(st.one_of(st.sampled_from(LORA_KEYS), st.text(min_size=1, max_size=12)), max_size=4,
                         unique=True))
    shapes = draw(st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3), min_size=len(keys),
                           max_size=len(keys)))
    weight = draw(st.one_of(st.none(), st.sampled_from(["1", "0.5", "-1", "nan", "inf", "x", ""])))
    return {"kind": kind, "keys": keys, "shapes": shapes, "bytes": draw(st.binary(max_size=64)), "weight": weight}


def check_lora(case: dict, ctx) -> str:
    import torch
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(dir=ctx["tmp"]))
    try:
        tensors = {k: torch.zeros(s) for k, s in zip(case["keys"], case["shapes"])}
        path = work / "lora.safetensors"
        if case["kind"] == "bytes":
            path.write_bytes(case["bytes"])
        elif case["kind"] == "tensors":
            save_file(tensors, str(path))
        elif case["kind"] == "pickle":
            path = work / "lora.bin"
            torch.save(tensors, path)
        elif case["kind"] == "folder":
            path = work / "lora"
            path.mkdir()
            save_file(tensors, str(path / "pytorch_lora_weights.safetensors"))
        else:
            path = work / "missing.safetensors"
        spec = str(path) + (f":{case['weight']}" if case["weight"] is not None else "")
        code, _, err = run_cli(["generate", "x", "--model", str(ctx["teacher"]), "--lora", spec, "--steps", "1",
                                "--num-images", "1", "--out", str(work / "g.png")])
        return check_one_line(code, err, f"--lora {case}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


SURFACES = {"cli": (cli_case(), check_cli), "folder": (folder_case(), check_folder),
            "model": (model_case(), check_model), "lora": (lora_case(), check_lora)}


def run_surface(name: str, examples: int, ctx: dict, rng_seed: int = 0) -> dict:
    """Run one surface for ``examples`` hypothesis examples; its counts and the first failure (if any)."""
    strategy, check = SURFACES[name]
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(case):
        try:
            outcomes[check(case, ctx)] += 1
        except Exception as exc:  # noqa: BLE001 -- counted and kept (the first in full); the run goes on
            outcomes["FAILED"] += 1
            kinds[f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"] += 1
            if not failures:
                failures.append(f"case = {case!r}\n{traceback.format_exc(limit=-8)}")

    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings on truncated / deprecated-mode files are expected here
        with parse_only() if name == "cli" else contextlib.nullcontext():
            seed(rng_seed)(prop)()
    failed = outcomes.pop("FAILED", 0)
    return {"cases": sum(outcomes.values()) + failed, "tracebacks": failed, "outcomes": dict(outcomes.most_common(12)),
            "failure_kinds": dict(kinds.most_common(8)), "first_failure": failures[0] if failures else None,
            "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", type=int, default=8000, help="examples of the cli surface")
    ap.add_argument("--folder", type=int, default=1600)
    ap.add_argument("--model", type=int, default=300)
    ap.add_argument("--lora", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the counts here (JSON)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    sys.addaudithook(_audit)
    with tempfile.TemporaryDirectory(prefix="lcm-fuzz-") as tmp:
        ctx = {"tmp": Path(tmp), "teacher": build_teacher(Path(tmp) / "teacher")}
        results = {}
        for name in SURFACES:
            n = getattr(args, name)
            if n:
                results[name] = run_surface(name, n, ctx, args.seed)
                r = results[name]
                print(f"{name}: {r['cases']} cases, {r['tracebacks']} tracebacks, {r['seconds']} s", flush=True)
    total = {"cases": sum(r["cases"] for r in results.values()),
             "tracebacks": sum(r["tracebacks"] for r in results.values())}
    report = {"command": "nice -n 10 .venv/bin/python scripts/fuzz_inputs.py " + " ".join(argv or sys.argv[1:]),
              "seed": args.seed, "total": total, "surfaces": results}
    print(f"total: {total['cases']} cases, {total['tracebacks']} tracebacks")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if total["tracebacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
