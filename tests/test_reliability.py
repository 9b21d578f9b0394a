"""Faults and bad input: NaN options, every image mode, symlinks, pickle weights, disk full, corrupt checkpoints,
orphan temp files, metrics after resume, the NaN-loss guard, refused runs (scripts/fault_soak.py soaks them)."""
import csv
import errno
import io
import math
import os
from contextlib import redirect_stderr, redirect_stdout

import click
import numpy as np
import pytest
import torch
from PIL import Image

import latentcm.training.checkpoint as ck
from latentcm.bundle import Bundle, ModelError
from latentcm.cli import cli, main
from latentcm.images import to_rgb
from latentcm.training.data.folders import load_pairs
from latentcm.training.loop import LoopConfig, NonFiniteLossError, fit, step_generator, truncate_metrics


def _commands(group=cli, path=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _main(argv):
    """(exit code, stdout, stderr) of ``lcm ARGV``."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# --- NaN / Inf options ---------------------------------------------------------------------------------

FLOAT_OPTIONS = [(path, p.opts[0]) for path, cmd in _commands() for p in cmd.params
                 if isinstance(p.type, click.types.FloatParamType)]


def test_every_command_has_its_float_options_found():
    assert len(FLOAT_OPTIONS) >= 10 and ("generate",) in {p for p, _ in FLOAT_OPTIONS}


@pytest.mark.parametrize("path, option", FLOAT_OPTIONS, ids=[f"{' '.join(p)} {o}" for p, o in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_every_float_option_refuses_nan_and_inf(path, option, value, monkeypatch):
    for _, cmd in _commands():
        monkeypatch.setattr(cmd, "callback", lambda **kw: pytest.fail("parsing let a non-finite value through"))
    code, _, err = _main([*path, option, value])
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("lcm: error:") and option in err and "Traceback" not in err


def test_omegas_list_refuses_nan():
    code, _, err = _main(["ablate", "guidance", "--omegas", "2,nan"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("lcm: error:")


def test_python_api_refuses_nan_guidance(micro_teacher):
    bundle = Bundle.load(micro_teacher)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ModelError, match="finite"):
            bundle.generate(["a red circle"], [0], steps=1, guidance=bad)


# --- every image mode becomes 8-bit RGB -------------------------------------------------------------------

def _rgb(image):
    return np.asarray(to_rgb(image)).tolist()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], np.uint16)  # 8-bit 0, 1, 128, 255
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        assert _rgb(im) == [[[0] * 3, [1] * 3, [128] * 3, [255] * 3]]
    for mode in ("I;16B", "I;16L"):
        assert _rgb(Image.fromarray(a).convert("I").convert(mode) if mode != "I;16L" else Image.fromarray(a)) \
            == [[[0] * 3, [1] * 3, [128] * 3, [255] * 3]]


def test_a_sixteen_bit_png_in_a_folder_keeps_its_brightness(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(20000, 40000, (32, 32)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("grey")
    pairs, report = load_pairs(tmp_path, 32)
    assert report.loaded == 1
    mean = np.asarray(pairs[0][0], np.float64).mean()
    assert abs(mean - a.mean() / 257) < 1.0  # ~118, not pure white (255)


@pytest.mark.parametrize("mode, pixels, expected", [
    ("I", np.array([[0, 200, 255]], np.int32), [[0] * 3, [200] * 3, [255] * 3]),              # 8-bit values
    ("I", np.array([[0, 32896, 65535, 70000]], np.int32), [[0] * 3, [128] * 3, [255] * 3, [255] * 3]),
    ("F", np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), [[0] * 3, [128] * 3, [255] * 3, [0] * 3]),  # 0..1
    ("F", np.array([[-3.0, 50.0, 300.0]], np.float32), [[0] * 3, [50] * 3, [255] * 3]),               # 0..255
    ("LA", np.array([[[100, 255], [100, 0], [0, 128]]], np.uint8), [[100] * 3, [255] * 3, [127] * 3]),
    ("RGBA", np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 51]]], np.uint8),
     [[10, 20, 30], [255, 255, 255], [204, 204, 204]]),
    ("CMYK", np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 0, 128]]], np.uint8),
     [[0, 255, 255], [0, 0, 0], [127, 0, 127]]),
])
def test_every_mode_matches_a_hand_made_array(mode, pixels, expected):
    assert _rgb(Image.fromarray(pixels, mode)) == [expected]


def test_palette_transparency_is_composited_on_white(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.putpixel((2, 0), 1)
    p.info["transparency"] = 0
    assert _rgb(p) == [[[255, 255, 255], [200, 100, 50], [200, 100, 50]]]
    p.save(tmp_path / "p.png")  # and as a file: tRNS chunk
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P" and _rgb(im) == [[[255, 255, 255], [200, 100, 50], [200, 100, 50]]]
    pa = Image.new("PA", (2, 1))
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((0, 0), (0, 0))
    pa.putpixel((1, 0), (0, 255))
    assert _rgb(pa) == [[[255, 255, 255], [10, 20, 30]]]


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                  "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "F"])
def test_every_mode_becomes_rgb(mode):
    out = to_rgb(Image.new(mode, (3, 2)))
    assert out.mode == "RGB" and out.size == (3, 2)


# --- nothing outside the folder is read -------------------------------------------------------------------

def test_symlinks_leaving_the_folder_are_skipped_and_counted(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside / "secret.png")
    (outside / "secret.txt").write_text("secret caption")
    (outside / "dir").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside / "dir" / "s.png")
    (outside / "dir" / "s.txt").write_text("secret caption")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(data / "ok.png")
    (data / "ok.txt").write_text("blue")
    os.symlink(data / "ok.png", data / "inside.png")       # inside the folder: fine
    os.symlink(data / "ok.txt", data / "inside.txt")
    os.symlink(outside / "secret.png", data / "link.png")  # leaves the folder
    (data / "link.txt").write_text("a caption")
    os.symlink(outside / "secret.txt", data / "ok2.txt")    # a caption that leaves the folder
    Image.new("RGB", (8, 8), (0, 255, 0)).save(data / "ok2.png")
    os.symlink(outside / "dir", data / "linkdir")           # a directory that leaves the folder
    os.symlink(data, data / "loop")                         # a loop back into the folder
    pairs, report = load_pairs(data, 8)
    assert sorted(text for _, text in pairs) == ["blue", "blue"]
    assert sorted(report.skipped["symlink outside the folder"]) == ["link.png", "linkdir/", "ok2.txt"]
    assert report.skipped["missing caption"] == ["ok2.png"]
    assert "symlink outside the folder: 3" in report.summary()
    assert all(np.asarray(im)[0, 0].tolist() != [255, 0, 0] for im, _ in pairs)


@pytest.mark.parametrize("name", ["../outside/secret.png", "/ABS/secret.png", "a/../../outside/secret.png", ".."])
def test_metadata_file_names_outside_the_folder_are_never_read(tmp_path, name):
    import json

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside / "secret.png")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    name = name.replace("/ABS", str(outside))
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "secret"}) + "\n"
                                         + json.dumps({"file_name": "./ok.png", "text": "fine"}) + "\n")
    pairs, report = load_pairs(data, 8)
    assert [t for _, t in pairs] == ["fine"]
    assert report.skipped == {"file_name outside the folder": ["metadata.jsonl:1"]}


# --- safetensors only ---------------------------------------------------------------------------------------

def test_pickle_weights_are_refused_with_the_file_named(micro_teacher, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(micro_teacher, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.bin is a pickle weights file"):
        Bundle.load(folder)
    code, _, err = _main(["generate", "x", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "g.png")])
    assert code == 2 and err.count("\n") == 1 and "diffusion_pytorch_model.bin" in err and "safetensors" in err


def test_corrupt_model_weights_are_one_model_error(micro_teacher, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(micro_teacher, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match="cannot load .*vae"):
        Bundle.load(folder)


# --- the loop under faults ------------------------------------------------------------------------------------

class LinTask:
    """A 4 -> 1 linear regression: a training task that runs in milliseconds."""

    def __init__(self, nan_at=()):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.ema = torch.nn.Linear(4, 1).requires_grad_(False)
        self.ema.load_state_dict(self.net.state_dict())
        self.nan_at, self.updates = set(nan_at), []

    def modules(self):
        return {"net": self.net, "ema": self.ema}

    def parameters(self):
        return list(self.net.parameters())

    def batch(self, step):
        g = step_generator(0, step)
        x = torch.randn(8, 4, generator=g)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, batch, step):
        loss = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        return (loss * float("nan") if step in self.nan_at else loss), {}

    def after_update(self, step):
        self.updates.append(step)
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 0.5)

    def preview(self, step, out_dir):
        pass


CFG = LoopConfig(max_steps=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=2, keep_checkpoints=3)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _rows(out):
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _fake_enospc(budget):
    """A save_file that writes ``budget`` bytes of the file and then fails as a full disk would."""
    from safetensors.torch import save

    def save_file(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(data[:budget])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    return save_file


def test_disk_full_is_one_line_naming_the_folder_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = ck.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real(tensors, filename, metadata=metadata)
        return _fake_enospc(100)(tensors, filename, metadata)
    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(ck.CheckpointWriteError) as exc:
        fit(LinTask(), CFG, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "No space left on device" in msg and str(tmp_path / "checkpoints") in msg
    assert msg.endswith("last good checkpoint: step-0000002.safetensors")
    assert isinstance(exc.value, OSError)  # the CLI's one-line, exit-2 path
    assert ck.temp_files(tmp_path / "checkpoints") == []
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002.safetensors"]
    task = LinTask()
    assert ck.load_checkpoint(tmp_path / "checkpoints" / "step-0000002.safetensors", task.modules(), None)["step"] == 2


def test_disk_full_through_the_cli_is_one_line(micro_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "save_file", _fake_enospc(1000))
    out = tmp_path / "run"
    code, _, err = _main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2",
                          "--batch-size", "2", "--num-data", "4", "--validate-every", "0", "--checkpoint-every", "1"])
    lines = [line for line in err.splitlines() if line.startswith("lcm:")]
    assert code == 2 and lines == [err.strip().splitlines()[-1]] and "Traceback" not in err
    assert "No space left on device" in lines[0] and "last good checkpoint: none" in lines[0]
    assert ck.temp_files(out / "checkpoints") == []


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    full = LinTask()
    fit(full, CFG, tmp_path / "a")
    part = LinTask()
    fit(part, LoopConfig(**{**CFG.__dict__, "max_steps": 6}), tmp_path / "b")
    ckpts = ck.list_checkpoints(tmp_path / "b" / "checkpoints")
    assert [p.name for p in ckpts][-1] == "step-0000006.safetensors"
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:200])  # truncated newest
    resumed = LinTask()
    with caplog.at_level("WARNING"):
        assert fit(resumed, CFG, tmp_path / "b", resume=True) == 8
    assert "skipping step-0000006.safetensors" in caplog.text and "resuming from step-0000004" in caplog.text
    assert _same(full.net, resumed.net) and _same(full.ema, resumed.ema)
    assert (tmp_path / "b" / "checkpoints" / "step-0000006.safetensors.unreadable").is_file()
    assert [int(r["step"]) for r in _rows(tmp_path / "b")] == list(range(1, 9))


def test_resume_with_no_readable_checkpoint_is_refused(tmp_path):
    fit(LinTask(), LoopConfig(**{**CFG.__dict__, "max_steps": 2}), tmp_path)
    for p in ck.list_checkpoints(tmp_path / "checkpoints"):
        p.write_bytes(b"not a checkpoint")
    task = LinTask()
    before = [v.clone() for v in task.net.state_dict().values()]
    with pytest.raises(ck.CheckpointReadError, match="no readable checkpoint"):
        fit(task, CFG, tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, task.net.state_dict().values()))


def test_a_checkpoint_of_another_model_changes_nothing(tmp_path):
    path = ck.save_checkpoint(tmp_path / "step-0000001.safetensors", {"net": torch.nn.Linear(3, 1)}, None, {"step": 1})
    task = LinTask()
    before = task.net.weight.clone()
    with pytest.raises(ck.CheckpointReadError, match="shape"):
        ck.load_checkpoint(path, {"net": task.net}, None)
    assert torch.equal(before, task.net.weight)


def test_orphan_temp_files_are_removed_on_the_next_start(tmp_path):
    fit(LinTask(), LoopConfig(**{**CFG.__dict__, "max_steps": 2}), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    for name in (".tmp-step-0000004-abcd1234", ".tmpk3j4h5", "step-0000004.safetensors.tmp"):
        (ckpt_dir / name).write_bytes(b"half a checkpoint")
    assert len(ck.temp_files(ckpt_dir)) == 3
    fit(LinTask(), LoopConfig(**{**CFG.__dict__, "max_steps": 4}), tmp_path, resume=True)
    assert ck.temp_files(ckpt_dir) == []


def test_an_interrupted_write_removes_its_temp_file(tmp_path, monkeypatch):
    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(ck, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "step-0000001.safetensors", {"m": torch.nn.Linear(2, 2)}, None, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_metrics_has_each_step_once_after_a_resume(tmp_path):
    full = LinTask()
    fit(full, CFG, tmp_path / "a")
    part = LinTask()
    fit(part, LoopConfig(**{**CFG.__dict__, "max_steps": 5}), tmp_path / "b")  # checkpoints 2, 4 and 5
    (tmp_path / "b" / "checkpoints" / "step-0000005.safetensors").unlink()  # as if killed before writing step 5
    with open(tmp_path / "b" / "metrics.csv", "a") as fh:
        fh.write("6,0.1,0.3")  # and half-way through a row
    resumed = LinTask()
    fit(resumed, CFG, tmp_path / "b", resume=True)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [int(r["step"]) for r in b] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    assert _same(full.net, resumed.net)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n2,0.41\n4,0.2\n5,0.")
    assert truncate_metrics(path, 2) == 4
    assert path.read_text() == "step,loss\n1,0.5\n2,0.41\n"
    assert truncate_metrics(path, 2) == 0
    truncate_metrics(path, 0)
    assert not path.exists()


def test_a_nan_loss_skips_the_update_and_is_counted(tmp_path):
    task, clean = LinTask(nan_at={2, 3}), LinTask()
    fit(task, CFG, tmp_path)
    assert task.updates == [0, 1, 4, 5, 6, 7]  # no update and no EMA on the bad steps
    rows = _rows(tmp_path)
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert int(rows[-1]["skipped_total"]) == 2
    assert all(math.isfinite(p.item()) for p in task.net.parameters() for p in p.flatten())
    meta = ck.read_checkpoint(ck.list_checkpoints(tmp_path / "checkpoints")[-1])[1]
    assert meta["skipped_steps"] == 2
    assert not _same(task.net, clean.net)


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_state(tmp_path):
    cfg = LoopConfig(**{**CFG.__dict__, "max_steps": 20, "max_bad_steps": 3, "checkpoint_every": 100})
    task = LinTask(nan_at=set(range(5, 20)))
    with pytest.raises(NonFiniteLossError) as exc:
        fit(task, cfg, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "step 8" in msg and "3 updates in a row" in msg and "step-0000008" in msg
    assert isinstance(exc.value, ValueError)  # the CLI's one-line, exit-2 path
    good = LinTask()
    fit(good, LoopConfig(**{**cfg.__dict__, "max_steps": 5}), tmp_path / "good")
    saved = LinTask()
    meta = ck.load_checkpoint(tmp_path / "checkpoints" / "step-0000008.safetensors", saved.modules(), None)
    assert meta["stopped"] == "non-finite" and _same(saved.net, good.net) and _same(saved.ema, good.ema)


# --- refused runs leave nothing ----------------------------------------------------------------------------------

def test_a_refused_run_leaves_no_out_folder(micro_teacher, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "run"
    code, _, err = _main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--data", str(empty),
                          "--max-steps", "1", "--validate-every", "0"])
    assert code == 2 and "no usable image-caption pairs" in err
    assert not (tmp_path / "new").exists()
    code, _, err = _main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--skip", "300",
                          "--max-steps", "1", "--validate-every", "0", "--num-data", "2"])
    assert code == 2 and "skip" in err and not (tmp_path / "new").exists()
