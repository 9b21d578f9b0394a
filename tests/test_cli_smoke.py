"""One smoke test per ``lcm`` command: real, commonly used arguments on micro settings, asserting on what it wrote.

A command that loses an option (as ``train-teacher --max-minutes`` once did while the README documented it)
fails here: every command runs once end to end, and every option of README.md's "Command line" synopsis
must exist in that command's ``--help``. ``test_every_command_has_a_smoke_test`` keeps the list complete.
"""
import csv
import json
import re
from pathlib import Path

import click
import pytest
import torch
from PIL import Image

from latentcm import cli as cli_module
from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.evaluation import references
from latentcm.evaluation import results as results_file

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on a blue background"
QUIET = ["--batch-size", "2", "--validate-every", "0"]  # micro training runs: tiny batches, no preview grids


def run(args, capsys) -> list[str]:
    """Run ``lcm ARGS`` in-process; it must succeed. Returns its stdout lines."""
    args = [str(a) for a in args]
    try:
        main(args)
    except SystemExit as exc:
        pytest.fail(f"lcm {' '.join(args)} exited with {exc.code}: {capsys.readouterr().err.strip()}")
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return out.out.strip().splitlines()


def fails(args, capsys) -> str:
    """Run ``lcm ARGS``; it must fail with one line and exit code 2. Returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1, err
    return err


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    """One cache of reference statistics for every evaluation command of this module (computed once)."""
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture
def cached(eval_cache, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(eval_cache))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)  # real images of a reference set (micro judge)


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    """`lcm world export DIR --style striped --count 8` (the fine-tuning set)."""
    out = tmp_path_factory.mktemp("striped") / "striped"
    main(["world", "export", str(out), "--style", "striped", "--count", "8"])
    return out


@pytest.fixture(scope="module")
def lcm_lora(micro_teacher, tmp_path_factory):
    """`lcm distill --lora 4`: an LCM-LoRA folder of the micro teacher."""
    out = tmp_path_factory.mktemp("lcm-lora") / "lora"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--lora", "4", "--max-steps", "2",
          "--num-data", "4", "--loss", "huber", *QUIET])
    return out


# --- train-teacher ---------------------------------------------------------------------------------------

def test_train_teacher_all_then_export(tmp_path, capsys):
    build = tmp_path / "build"
    assert run(["train-teacher", "all", "--out", build, "--preset", "micro", "--max-steps", "2"], capsys) == ["finished"]
    for stage in ("vae", "clip", "judge", "unet"):
        assert json.loads((build / stage / "final" / "DONE").read_text())["steps"] == 2, stage
        assert (build / stage / "metrics.csv").is_file()
    # rerunning with --resume skips the finished stages
    assert run(["train-teacher", "all", "--out", build, "--preset", "micro", "--resume"], capsys) == ["finished"]
    assert run(["train-teacher", "export", "--out", build], capsys) == [str(build / "teacher")]
    teacher = Bundle.load(build / "teacher")
    assert not teacher.is_lcm and teacher.scheduler_config["_class_name"] == "DDIMScheduler"
    assert teacher.unet.dtype == torch.float32  # stored in fp16, loaded back as fp32
    images = teacher.generate([PROMPT], [0], "ddim", 2, 7.5)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_train_teacher_one_stage_with_a_time_limit(tmp_path, capsys):
    from diffusers import AutoencoderKL

    build = tmp_path / "build"
    assert run(["train-teacher", "vae", "--out", build, "--preset", "micro", "--steps", "2", "--max-minutes", "5",
                "--seed", "3"], capsys) == ["finished"]
    assert json.loads((build / "vae" / "final" / "DONE").read_text())["steps"] == 2
    vae = AutoencoderKL.from_pretrained(build / "vae" / "final")
    assert vae.config.scaling_factor > 0 and not (build / "clip").exists()


# --- sampling ---------------------------------------------------------------------------------------------

def test_generate_with_an_lcm_and_a_teacher(micro_lcm, micro_teacher, tmp_path, capsys):
    lcm_png, teacher_png = tmp_path / "lcm.png", tmp_path / "sub" / "teacher.png"
    assert run(["generate", PROMPT, "--model", micro_lcm, "--steps", "2", "--guidance", "8.5", "--seed", "3",
                "--num-images", "2", "--out", lcm_png], capsys) == [str(lcm_png)]
    assert png_size(lcm_png) == (2 * 64, 64)
    assert run(["generate", PROMPT, "--model", micro_teacher, "--sampler", "dpm-solver++", "--steps", "2",
                "--guidance", "5", "--num-images", "3", "--height", "32", "--width", "48", "--out", teacher_png],
               capsys) == [str(teacher_png)]
    assert png_size(teacher_png) == (3 * 48, 32)


def test_generate_img2img_and_lcm_lora(micro_lcm, micro_teacher, lcm_lora, tmp_path, capsys):
    init = tmp_path / "init.png"
    main(["world", "export", str(tmp_path / "w"), "--count", "1"])
    Image.open(next((tmp_path / "w").glob("*.png"))).save(init)
    capsys.readouterr()
    i2i, lora, both = tmp_path / "i2i.png", tmp_path / "lora.png", tmp_path / "lora-i2i.png"
    assert run(["generate", PROMPT, "--model", micro_lcm, "--init-image", init, "--strength", "0.6", "--steps", "2",
                "--num-images", "2", "--out", i2i], capsys) == [str(i2i)]
    assert png_size(i2i) == (2 * 64, 64)
    assert run(["generate", PROMPT, "--model", micro_teacher, "--lora", lcm_lora, "--steps", "2",
                "--num-images", "1", "--out", lora], capsys) == [str(lora)]
    assert run(["generate", PROMPT, "--model", micro_teacher, "--lora", f"{lcm_lora}:0.5", "--sampler", "lcm",
                "--init-image", init, "--steps", "1", "--num-images", "1", "--out", both], capsys) == [str(both)]
    assert png_size(lora) == png_size(both) == (64, 64)


def test_compare(micro_lcm, micro_teacher, tmp_path, capsys):
    out = tmp_path / "compare.png"
    lines = run(["compare", PROMPT, "--lcm", micro_lcm, "--teacher", micro_teacher, "--num-images", "1",
                 "--seed", "2", "--out", out], capsys)
    assert lines[0] == str(out) and len(lines) == 5 and all(ln.endswith(" s/image") for ln in lines[1:])
    assert png_size(out)[1] == 4 * 64


def test_models(capsys):
    from latentcm import registry

    found = json.loads("\n".join(run(["models", "--json"], capsys)))
    assert found == {k: str(v) for k, v in registry.shipped_models().items()}
    assert run(["models"], capsys) == [f"{k}\t{v}" for k, v in found.items()]


# --- training -----------------------------------------------------------------------------------------------

def test_distill_then_resume_with_more_steps(micro_teacher, tmp_path, capsys):
    out = tmp_path / "lcm"
    args = ["distill", "--teacher", micro_teacher, "--out", out, "--num-data", "4", "--solver", "dpm-solver++",
            "--skip", "50", "--loss", "huber", "--omega-min", "2", "--omega-max", "8", "--ema", "0.9",
            "--lr", "1e-3", "--lr-schedule", "cosine", "--min-lr-ratio", "0.5", "--grad-clip", "0.5",
            "--batch-size", "2", "--validate-every", "1", "--checkpoint-every", "1"]
    assert run([*args, "--max-steps", "1", "--max-minutes", "5"], capsys) == [str(out)]
    lcm = Bundle.load(out)
    assert lcm.is_lcm and lcm.original_inference_steps == 20  # 1000 // k = 50
    assert (out / "previews").is_dir() and any((out / "previews").iterdir())
    first = {k: v.clone() for k, v in lcm.unet.state_dict().items()}
    assert run([*args, "--max-steps", "2", "--resume"], capsys) == [str(out)]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"]
    # cosine from 1e-3 to 0.5e-3 over 2 steps: step index 0 at the peak, index 1 half way (0.75e-3)
    assert [round(float(r["lr"]), 8) for r in rows] == [1e-3, 7.5e-4]
    again = Bundle.load(out).unet.state_dict()
    assert any(not torch.equal(first[k], again[k]) for k in first)  # step 2 trained and was exported
    assert "lcm distill" in (out / "README.md").read_text()


def test_distill_lora(lcm_lora):
    for name in ("pytorch_lora_weights.safetensors", "lcm_lora_kohya.safetensors", "scheduler_config.json",
                 "README.md"):
        assert (lcm_lora / name).is_file(), name
    assert json.loads((lcm_lora / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"


def test_distill_on_a_data_folder(micro_teacher, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "lcm"
    main(["world", "export", str(data), "--count", "4"])
    capsys.readouterr()
    lines = run(["distill", "--teacher", micro_teacher, "--data", data, "--out", out, "--max-steps", "1",
                 "--gradient-checkpointing", *QUIET], capsys)
    assert lines[-1] == str(out) and Bundle.load(out).is_lcm


def test_finetune_on_the_striped_set(micro_lcm, striped, tmp_path, capsys):
    out = tmp_path / "lcf"
    lines = run(["finetune", "--model", micro_lcm, "--data", striped, "--out", out, "--max-steps", "2",
                 "--lr", "1e-3", "--max-timestep", "999", *QUIET], capsys)
    assert "loaded 8 image-caption pairs" in lines[0] and lines[-1] == str(out)
    assert Bundle.load(out).is_lcm and "fine-tuned from" in (out / "README.md").read_text()


def test_finetune_teacher_full_and_lora(micro_teacher, striped, tmp_path, capsys):
    full, style = tmp_path / "teacher", tmp_path / "style"
    lines = run(["finetune-teacher", "--teacher", micro_teacher, "--data", striped, "--out", full,
                 "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3"], capsys)
    assert "loaded 8 image-caption pairs" in lines[0] and lines[-1] == str(full)
    assert not Bundle.load(full).is_lcm
    lines = run(["finetune-teacher", "--teacher", micro_teacher, "--data", striped, "--out", style,
                 "--max-steps", "2", "--batch-size", "2", "--lora", "4", "--lora-alpha", "4"], capsys)
    assert lines[-1] == str(style) and (style / "pytorch_lora_weights.safetensors").is_file()
    assert not (style / "unet").exists()


def test_export_fp16_single_file(micro_lcm, tmp_path, capsys):
    out = tmp_path / "release"
    assert run(["export", "--model", micro_lcm, "--out", out, "--fp16", "--single-file", "--base-model", "me/base"],
               capsys) == [str(out)]
    assert (out / "release.safetensors").is_file() and (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert re.search(r'^base_model: "?me/base"?$', (out / "README.md").read_text(), re.MULTILINE)
    assert Bundle.load(out).is_lcm


@pytest.mark.parametrize("style, split", [("none", "train"), ("none", "heldout"), ("none", "paraphrase"),
                                          ("striped", "train"), ("striped", "heldout")])
def test_world_export(style, split, tmp_path, capsys):
    out = tmp_path / "w"
    assert run(["world", "export", out, "--split", split, "--style", style, "--count", "3", "--seed", "1"],
               capsys) == [str(out)]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(png_size(out / r["file_name"]) == (64, 64) for r in rows)
    assert all(("striped" in r["text"]) == (style == "striped") for r in rows)


def test_world_export_refuses_a_striped_paraphrase_split(tmp_path, capsys):
    assert "splits train, heldout" in fails(["world", "export", tmp_path / "w", "--style", "striped",
                                              "--split", "paraphrase"], capsys)


# --- evaluation -------------------------------------------------------------------------------------------

def test_evaluate_presets(micro_lcm, micro_teacher, micro_judge, tmp_path, cached, capsys):
    common = ["--teacher", micro_teacher, "--judge", micro_judge, "--num-samples", "4", "--batch-size", "4"]
    out = tmp_path / "table1"
    lines = run(["evaluate", "--model", micro_lcm, *common, "--steps", "1", "--samplers", "lcm,ddim",
                 "--out", out], capsys)
    assert lines[-1] == str(out / "results.json")
    results_file.validate_results(json.loads((out / "results.json").read_text()))
    assert (out / "table1.md").is_file() and (out / "table1.png").is_file()
    # the judge-accuracy evaluations (formerly evaluate-lcm and evaluate-teacher)
    out = tmp_path / "lcm"
    lines = run(["evaluate", "--preset", "lcm", "--model", micro_lcm, *common, "--out", out], capsys)
    assert lines[-1] == str(out / "results.json") and (out / "results.json").is_file()
    out = tmp_path / "teacher"
    lines = run(["evaluate", "--preset", "teacher", "--model", micro_teacher, *common, "--samplers", "dpm-solver++",
                 "--steps", "2", "--out", out], capsys)
    assert lines[-1] == str(out / "results.json") and (out / "results.json").is_file()


def test_ablate_guidance(micro_lcm, micro_teacher, micro_judge, tmp_path, cached, capsys, monkeypatch):
    from latentcm.evaluation import presets

    monkeypatch.setattr(presets, "TEACHER_STEPS", 2)  # the teacher ODE beside the LCM: a short one
    out = tmp_path / "guidance"
    lines = run(["ablate", "guidance", "--model", micro_lcm, "--teacher", micro_teacher, "--judge", micro_judge,
                 "--omegas", "2,8", "--steps", "1", "--num-samples", "2", "--batch-size", "2", "--resamples", "0",
                 "--out", out], capsys)
    assert lines[-1] == str(out / "results.json")
    assert (out / "results.md").is_file() and (out / "tradeoff.png").is_file() and (out / "fidelity.png").is_file()
    assert [r["omega"] for r in json.loads((out / "results.json").read_text())["records"]] == [2, 8]


def test_ablate_solver_skip(micro_teacher, micro_judge, tmp_path, cached, capsys):
    out = tmp_path / "solver-skip"
    lines = run(["ablate", "solver-skip", "--teacher", micro_teacher, "--judge", micro_judge, "--solvers", "ddim",
                 "--skips", "50", "--iterations", "1", "--eval-every", "1", "--num-samples", "2",
                 "--batch-size", "2", "--num-data", "2", "--resamples", "10", "--out", out], capsys)
    assert lines[-1] == str(out / "results.json")
    assert (out / "results.md").is_file() and (out / "solver-skip.png").is_file()
    records = json.loads((out / "results.json").read_text())["records"]
    assert [(r["solver"], r["skip"], r["iteration"]) for r in records] == [("ddim", 50, 0), ("ddim", 50, 1)]


# --- serving ----------------------------------------------------------------------------------------------

def test_serve(micro_lcm, micro_teacher, lcm_lora):
    """`lcm serve` in a subprocess (it serves until interrupted): /health, one POST /api/generate, Ctrl-C."""
    import base64
    import io
    import os
    import signal
    import subprocess
    import sys
    import threading
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "latentcm.cli", "serve", "--port", "0", "--no-ui", "--lcm", str(micro_lcm),
         "--teacher", str(micro_teacher), "--lora", f"lcm-lora={lcm_lora}", "--max-batch", "2",
         "--batch-window-ms", "5", "--max-queue", "4"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        # a suite started in the background (`cmd &`) ignores SIGINT, and children inherit that: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(150, proc.kill)  # a server that never comes up must not hang the suite
    watchdog.start()
    try:
        url, log = None, []
        for line in proc.stderr:  # ends when the process exits
            log.append(line)
            if (found := re.match(r"serving (http://\S+)", line)):
                url = found.group(1).rstrip("/") + "/"
                break
        assert url, "".join(log)
        drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # keep draining the pipe
        drain.start()
        health = json.load(urllib.request.urlopen(url + "health", timeout=30))
        assert health["status"] == "ok" and "lcm-lora" in json.dumps(health)  # the registered LoRA
        request = urllib.request.Request(url + "api/generate", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": PROMPT, "steps": 1, "seed": 3}).encode())
        answer = json.load(urllib.request.urlopen(request, timeout=120))
        assert len(answer["images"]) >= 1
        with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
            assert image.size == (64, 64)
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # graceful: up to 5 s for open connections + 10 s for the batcher
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            proc.wait(timeout=30)
            drain.join(5)
            pytest.fail("lcm serve did not exit within 60 s of Ctrl-C:\n" + "".join(log[-200:]))
        finally:
            watchdog.cancel()
            proc.kill()


# --- every command, its --help and the README ------------------------------------------------------------

def leaf_commands(group: click.Group = cli_module.cli, prefix: tuple[str, ...] = ()):
    """{("world", "export"): command, ...}: every runnable command, groups' subcommands included."""
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(leaf_commands(command, (*prefix, name)))
        else:
            found[(*prefix, name)] = command
    return found


def help_text(path: tuple[str, ...], capsys) -> str:
    """What `lcm PATH --help` prints (exit code 0)."""
    try:
        main([*path, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None), (path, exc.code)
    return capsys.readouterr().out


def help_options(path: tuple[str, ...], capsys) -> set[str]:
    """The options `lcm PATH --help` lists."""
    text = help_text(path, capsys)
    assert text.startswith("Usage: lcm " + " ".join(path) + " "), text
    options = text.split("\nOptions:\n", 1)[1]
    # an option line: "  -h, --steps, --max-steps INTEGER RANGE  help..." (names in the first column; wrapped
    # help text is indented further)
    return {name for line in options.splitlines() if re.match(r"  -", line)
            for name in re.findall(r"(?<![\w-])--[\w-]+", re.split(r"\s{2,}", line.strip())[0])}


def readme_synopsis() -> dict[tuple[str, ...], set[str]]:
    """{command path: options} of README.md's "Command line" block (a `lcm ...` line plus its indented lines)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Command line\n+```text\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no ```text block under '## Command line'"
    commands = leaf_commands()
    entries: dict[tuple[str, ...], set[str]] = {}
    path = None
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0]
        if line.startswith("lcm "):
            words = line.split()[1:]
            path = next((p for n in (2, 1) if (p := tuple(words[:n])) in commands), None)
            assert path is not None, f"README synopsis names a command lcm has not: {line.strip()}"
            entries.setdefault(path, set())
        elif not line.strip():
            continue
        assert path is not None, line
        entries[path] |= set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", line))
    return entries


def test_every_readme_option_exists_in_its_commands_help(capsys):
    synopsis = readme_synopsis()
    assert {("generate",), ("distill",), ("train-teacher",), ("world", "export")} <= synopsis.keys()
    missing = {}
    for path, command in leaf_commands().items():
        listed = help_options(path, capsys)
        assert "--help" in listed, path
        declared = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        assert declared <= listed, (path, declared - listed)  # --help shows every option
        if synopsis.get(path, set()) - listed:
            missing[" ".join(path)] = sorted(synopsis[path] - listed)
    assert not missing, f"README.md's Command line block names options these commands lack: {missing}"
    # and every group's --help lists its subcommands
    for path in {(), *(p[:-1] for p in leaf_commands() if len(p) > 1)}:
        listed = help_text(path, capsys).split("\nCommands:\n", 1)[1]
        names = {p[len(path)] for p in leaf_commands() if p[:len(path)] == path}
        assert names <= set(re.findall(r"^  (\S+)", listed, re.MULTILINE)), path


def test_prepare_then_distill_on_the_latent_shards(micro_teacher, tmp_path, capsys):
    shards, latents = tmp_path / "shards", tmp_path / "latents"
    run(["world", "export", shards, "--format", "shards", "--count", "6", "--shard-size", "3"], capsys)
    out = run(["prepare", "--model", micro_teacher, "--data", f"{shards}/{{000000..000001}}.tar", "--out", latents,
               "--text", "states", "--dtype", "float16", "--batch-size", "4"], capsys)
    assert out[0].startswith("6 samples in 2 latent shards") and "lcm distill" in out[-1]
    assert sorted(p.name for p in latents.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert json.loads((latents / "prepare.json").read_text())["loaded"] == 6
    rerun = run(["prepare", "--model", micro_teacher, "--data", f"{shards}/{{000000..000001}}.tar", "--out", latents],
                capsys)
    assert "(2 kept from an earlier run" in rerun[0]
    run(["distill", "--teacher", micro_teacher, "--out", tmp_path / "lcm", "--data", f"{latents}/{{000000..000001}}.tar",
         "--max-steps", "2", *QUIET], capsys)
    assert Bundle.load(tmp_path / "lcm").is_lcm
    assert "is an LCM" in fails(["prepare", "--model", tmp_path / "lcm", "--data", shards / "000000.tar", "--out",
                                 tmp_path / "x"], capsys)


# Each command's smoke test above. A new command needs one here (and a test that runs it).
SMOKED = {
    ("generate",): test_generate_with_an_lcm_and_a_teacher,
    ("compare",): test_compare,
    ("models",): test_models,
    ("train-teacher",): test_train_teacher_all_then_export,
    ("evaluate",): test_evaluate_presets,
    ("ablate", "solver-skip"): test_ablate_solver_skip,
    ("ablate", "guidance"): test_ablate_guidance,
    ("world", "export"): test_world_export,
    ("distill",): test_distill_then_resume_with_more_steps,
    ("finetune",): test_finetune_on_the_striped_set,
    ("finetune-teacher",): test_finetune_teacher_full_and_lora,
    ("export",): test_export_fp16_single_file,
    ("serve",): test_serve,
    ("prepare",): test_prepare_then_distill_on_the_latent_shards,
}


def test_every_command_has_a_smoke_test():
    missing = sorted(" ".join(p) for p in leaf_commands() if p not in SMOKED)
    assert not missing, f"add a smoke test to tests/test_cli_smoke.py (and SMOKED) for: lcm {', lcm '.join(missing)}"
