"""What a new user tripped over: latent shards of another model, an all-unreadable prepare, a corrupt
model_index.json, Ctrl-C in training, diffusers-style flags, a LoRA of another base, and the commands' progress
and summary lines. Each is one line on stderr with exit 2 (130 for Ctrl-C), or output printed in time."""
import io
import json
import shutil
import signal
import tarfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.errors import ModelError
from latentcm.training import loop
from latentcm.training.checkpoint import list_checkpoints
from latentcm.training.data import prepare as prep
from latentcm.training.data.latent_format import vae_config_hash
from latentcm.training.data.shards import ShardSource

QUIET = ["--batch-size", "2", "--validate-every", "0"]


def _fails(args, capsys) -> tuple[int, str]:
    """(exit code, the stderr) of ``lcm ARGS`` that must fail with one line (progress bars aside)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "shard/s]" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("lcm: ") and "Traceback" not in err, err
    return exc.value.code, lines[0]


def _rewrite_meta(src, dst, change):
    """Copy a latent shard with its __meta__.json changed by ``change(meta)`` (in place)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name == "__meta__.json":
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


@pytest.fixture(scope="module")
def latent_shard(micro_bundle, world_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    prep.prepare(micro_bundle, str(world_shards / "000000.tar"), out, prep.PrepareConfig(dtype="float32"))
    return out / "000000.tar"


# 1. latent shards of another model -------------------------------------------------------------------------

def test_latent_shards_of_another_vae_are_refused_naming_both(micro_teacher, micro_bundle, latent_shard, tmp_path,
                                                              capsys):
    with tarfile.open(latent_shard) as tar:
        meta = json.loads(tar.extractfile("__meta__.json").read())
    assert meta["vae_config_hash"] == vae_config_hash(micro_bundle.vae.config) and meta["latent_shape"] == [4, 16, 16]

    def sd15_shape(m):  # an f = 8 VAE at the same resolution, as `lcm prepare --model <an SD-1.5 folder>` records
        m.update(latent_shape=[4, 8, 8], model="sd15-folder")
        m.pop("vae_config_hash")

    def other_vae(m):
        m.update(vae_config_hash="0123456789abcdef", model="other-folder")
    for change, words in ((sd15_shape, ["sd15-folder", "[4, 8, 8]", "[4, 16, 16]"]),
                          (other_vae, ["other-folder", "0123456789abcdef", meta["vae_config_hash"]])):
        bad = _rewrite_meta(latent_shard, tmp_path / f"{change.__name__}.tar", change)
        code, err = _fails(["distill", "--teacher", micro_teacher, "--out", tmp_path / "run", "--data", bad,
                            "--max-steps", "1", *QUIET], capsys)
        assert code == 2 and all(w in err for w in [*words, str(micro_teacher)]), err
        assert not (tmp_path / "run").exists()
    old = _rewrite_meta(latent_shard, tmp_path / "old.tar", lambda m: m.pop("vae_config_hash"))  # older shards
    assert len(ShardSource(micro_bundle, str(old), 2).batch(0)) == 2


# 5. prepare on unreadable images ----------------------------------------------------------------------------

def test_prepare_of_only_unreadable_images_fails_and_leaves_no_shard(micro_teacher, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.png").write_bytes(b"not a png")
        (folder / f"{name}.txt").write_text("a red circle")
    code, err = _fails(["prepare", "--model", micro_teacher, "--data", folder, "--out", tmp_path / "lat"], capsys)
    assert code == 2 and "no usable image" in err and "unreadable image 2" in err
    assert not (tmp_path / "lat").exists()  # nothing else was in it


def test_prepare_hint_names_the_required_out(micro_teacher, tmp_path, capsys):
    main(["world", "export", str(tmp_path / "w"), "--count", "2"])
    main(["prepare", "--model", str(micro_teacher), "--data", str(tmp_path / "w"), "--out", str(tmp_path / "lat")])
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("train with: lcm distill") and " --out " in hint


# 6. corrupt model_index.json --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [("{not json", "cannot read"), ("[1, 2]", "not a JSON object")])
def test_a_corrupt_model_index_is_one_line_naming_the_file(micro_teacher, tmp_path, capsys, text, words):
    model = shutil.copytree(micro_teacher, tmp_path / "model")
    (model / "model_index.json").write_text(text)
    code, err = _fails(["generate", "a red circle", "--model", model, "--steps", "1", "--out", tmp_path / "x.png"],
                       capsys)
    assert code == 2 and str(model / "model_index.json") in err and words in err
    assert not (tmp_path / "x.png").exists()


# 8. Ctrl-C in training --------------------------------------------------------------------------------------

class LinTask:
    """A linear regression with an EMA copy: a Task of the loop in milliseconds."""

    def __init__(self):
        torch.manual_seed(0)
        self.net, self.ema = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1).requires_grad_(False)
        self.ema.load_state_dict(self.net.state_dict())

    def modules(self):
        return {"net": self.net, "ema": self.ema}

    def parameters(self):
        return list(self.net.parameters())

    def batch(self, step):
        x = torch.randn(8, 4, generator=loop.step_generator(0, step))
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, batch, step):
        return (self.net(batch["x"]) - batch["y"]).pow(2).mean(), {}

    def after_update(self, step):
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(p, 0.5)

    def preview(self, step, out_dir):
        pass


def _losses(run) -> list[list[str]]:
    """(step, loss, grad_norm) of every row of a run's metrics.csv, header included."""
    return [[line.split(",")[0], *line.split(",")[2:4]] for line in (run / "metrics.csv").read_text().splitlines()]


def _ctrl_c_at(monkeypatch, at: int) -> None:
    """Ctrl-C inside the train step of step index ``at`` (``at`` steps are finished)."""
    real = loop.train_step

    def train_step(task, opt, cfg, step, accelerator=None):
        if step == at:
            raise KeyboardInterrupt
        return real(task, opt, cfg, step, accelerator)
    monkeypatch.setattr(loop, "train_step", train_step)


def test_ctrl_c_checkpoints_the_last_step_and_resume_continues_exactly(tmp_path, monkeypatch):
    cfg = loop.LoopConfig(max_steps=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=4)
    full = LinTask()
    loop.fit(full, cfg, tmp_path / "a")
    with monkeypatch.context() as patch:
        _ctrl_c_at(patch, 6)
        with pytest.raises(loop.TrainingInterrupted) as exc:
            loop.fit(LinTask(), cfg, tmp_path / "b")
    ckpt = tmp_path / "b" / "checkpoints" / "step-0000006.safetensors"
    assert str(exc.value) == f"interrupted after step 6; checkpoint {ckpt}: rerun the same command with --resume " \
                             "to continue" and ckpt.is_file()
    resumed = LinTask()
    assert loop.fit(resumed, cfg, tmp_path / "b", resume=True) == 8
    assert len(_losses(tmp_path / "b")) == 9 and _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(full.net.state_dict().values(), resumed.net.state_dict().values()))
    assert torch.equal(full.ema.weight, resumed.ema.weight)


def interrupt_during_an_update(folder: str) -> None:
    """SIGINT inside the optimizer update / EMA: the update completes, counts as step 6, and is checkpointed; the
    resumed run equals an uninterrupted one. Run in a fresh interpreter (see the test below)."""
    from pathlib import Path

    cfg = loop.LoopConfig(max_steps=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=4)
    full = LinTask()
    loop.fit(full, cfg, Path(folder) / "a")
    task = LinTask()
    after_update = task.after_update

    def signalled(step):
        if step == 5:
            signal.raise_signal(signal.SIGINT)  # held until the EMA below is done
        after_update(step)
    task.after_update = signalled
    with pytest.raises(loop.TrainingInterrupted, match="interrupted after step 6;"):
        loop.fit(task, cfg, Path(folder) / "b")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = LinTask()
    loop.fit(resumed, cfg, Path(folder) / "b", resume=True)
    assert torch.equal(full.net.weight, resumed.net.weight) and torch.equal(full.ema.weight, resumed.ema.weight)
    assert _losses(Path(folder) / "a") == _losses(Path(folder) / "b")


def test_ctrl_c_during_an_update_finishes_and_counts_it(tmp_path):
    """``interrupt_during_an_update`` in a fresh interpreter with SIGINT at its default, as a user's ``lcm`` process
    is: a raised SIGINT crashes a process into which an earlier test loaded an OpenVINO runtime, and a suite run in
    the background ignores SIGINT."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_user_defects as t; "
            f"t.interrupt_during_an_update({str(tmp_path)!r})")
    # a suite started in the background (`cmd &`) ignores SIGINT, and children inherit that: restore it
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 0, result.stderr[-3000:]


def test_ctrl_c_in_lcm_distill_is_exit_130_with_the_resume_hint(micro_teacher, tmp_path, monkeypatch, capsys):
    _ctrl_c_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "lcm"), "--max-steps", "2",
              "--num-data", "4", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = tmp_path / "lcm" / "checkpoints" / "step-0000001.safetensors"
    assert exc.value.code == 130 and err.startswith("lcm: interrupted after step 1; checkpoint ")
    assert str(ckpt) in err and err.endswith("rerun the same command with --resume to continue") and ckpt.is_file()


def test_ctrl_c_before_the_first_step_says_there_is_nothing_to_resume(tmp_path):
    task = SimpleNamespace(modules=lambda: {"net": net}, parameters=lambda: list(net.parameters()))
    net = torch.nn.Linear(2, 1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    task.batch, task.loss, task.after_update, task.preview = interrupted, interrupted, None, None
    cfg = loop.LoopConfig(max_steps=4, lr=1e-2, warmup=0, schedule="constant")
    with pytest.raises(loop.TrainingInterrupted, match="no checkpoint yet") as exc:
        loop.fit(task, cfg, tmp_path)
    assert isinstance(exc.value, KeyboardInterrupt) and list_checkpoints(tmp_path / "checkpoints") == []


# 9. error text ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, hint", [
    (["distill", "--output_dir", "x"], "lcm distill takes --out, not --output_dir"),
    (["distill", "--output_dir=x"], "lcm distill takes --out, not --output_dir"),
    (["distill", "--pretrained_model_name_or_path", "x"], "lcm distill takes --teacher, not"),
    (["finetune", "--pretrained_model_name_or_path", "x"], "lcm finetune takes --model, not"),
    (["distill", "--max_train_steps", "5"], "takes --max-steps, not --max_train_steps"),
    (["distill", "--num_train_steps", "5"], "takes --max-steps, not --num_train_steps"),
    (["distill", "--learning_rate", "1e-4"], "takes --lr, not --learning_rate"),
    (["distill", "--train_batch_size", "4"], "takes --batch-size, not --train_batch_size"),
    (["distill", "--gradient_checkpointing"], "takes --gradient-checkpointing, not --gradient_checkpointing"),
    (["distill", "--resolution", "512"], "has no --resolution"),
])
def test_diffusers_flags_name_ours(args, hint, capsys):
    code, err = _fails(args, capsys)
    assert code == 2 and hint in err and "Did you mean" not in err, err


def _lora_for_another_base(micro_teacher, dest):
    """A diffusers LoRA whose first modules are twice as wide as the micro teacher's (another base's)."""
    from latentcm.models.lora import LoRAConfig, add_lora, peft_state_dict

    unet = Bundle.load(micro_teacher).unet
    add_lora(unet, LoRAConfig(rank=2), adapter_name="x")
    weights = {}
    for i, (key, value) in enumerate(sorted(peft_state_dict(unet, "x").items())):
        if i < 8:
            value = torch.zeros(value.shape[0], 2 * value.shape[1], *value.shape[2:]) if "lora_A" in key else \
                torch.zeros(2 * value.shape[0], *value.shape[1:])
        weights[f"unet.{key}"] = value.contiguous()
    dest.mkdir()
    save_file(weights, dest / "pytorch_lora_weights.safetensors")
    return dest


def test_a_lora_for_another_base_is_one_line_naming_the_shapes(micro_teacher, tmp_path, capsys):
    bad = _lora_for_another_base(micro_teacher, tmp_path / "lora")
    with pytest.raises(ModelError, match=r"8 weights disagree in shape, e\.g\. down_blocks\.\S+: file \[") as exc:
        Bundle.load(micro_teacher, loras=[(str(bad), 1.0)])
    assert "\n" not in str(exc.value)
    code, err = _fails(["generate", "a red circle", "--model", micro_teacher, "--lora", bad, "--steps", "1",
                        "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "model [" in err and "size mismatch" not in err


# 10. output in time -----------------------------------------------------------------------------------------

def test_finetune_prints_its_data_summary_before_training(micro_lcm, tmp_path, monkeypatch, capsys):
    from latentcm.training import recipes

    main(["world", "export", str(tmp_path / "data"), "--count", "3"])
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data" / "broken.txt").write_text("a red circle")
    capsys.readouterr()
    before = []
    real = recipes.fit

    def fit(*args, **kwargs):
        before.append(capsys.readouterr().out)
        return real(*args, **kwargs)
    monkeypatch.setattr(recipes, "fit", fit)
    main(["finetune", "--model", str(micro_lcm), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "lcf"),
          "--max-steps", "1", *QUIET])
    assert before[0].splitlines()[0].startswith("loaded 3") and "unreadable image: broken.png" in before[0]
    assert capsys.readouterr().out.strip() == str(tmp_path / "lcf")


def test_export_prints_each_step_and_what_it_wrote(micro_lcm, tmp_path, capsys):
    out = tmp_path / "release"
    main(["export", "--model", str(micro_lcm), "--out", str(out), "--single-file"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    err = captured.err
    for words in (f"loaded the LCM {micro_lcm}", "writing the diffusers pipeline", "  unet/ (", "  vae/ (",
                  "writing the single file release.safetensors", "README.md"):
        assert words in err, err
    closing = err.strip().splitlines()[-1]
    assert closing.startswith("wrote a LatentConsistencyModelPipeline folder with single file: ") and "MB" in closing


@pytest.mark.parametrize("fmt, words", [("imagefolder", "wrote 3 train images (seed 0) as PNGs + metadata.jsonl"),
                                        ("shards", "wrote 3 train images (seed 0) as 2 webdataset shards of up to 2")])
def test_world_export_says_what_it_wrote(tmp_path, capsys, fmt, words):
    main(["world", "export", str(tmp_path / "w"), "--count", "3", "--format", fmt, "--shard-size", "2"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "w") and words in captured.err


def test_the_serve_galleries_show_whole_images():
    from latentcm.serve.app import build_ui
    from latentcm.serve.validate import Limits

    demo = build_ui(SimpleNamespace(lora_files={}, limits=Limits(), teacher=None))
    galleries = [b for b in demo.blocks.values() if type(b).__name__ == "Gallery"]
    assert {g.elem_id for g in galleries} == {"lcm-gallery", "teacher-gallery"}
    assert all(g.height == "auto" and g.object_fit == "contain" for g in galleries)
