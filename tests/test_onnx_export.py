"""`lcm export --format onnx|openvino` and `lcm generate --runtime onnx|openvino`: optimum's own
ORTLatentConsistencyModelPipeline loads the export offline and draws lcm generate's images; latentcm's runtime
runs the graphs with its own sampler and matches the torch model.

optimum-onnx 0.1.0 pins transformers < 4.58, which cannot load latentcm's models (transformers 5 writes CLIP
weights without the ``text_model.`` prefix), so optimum runs in a subprocess of its own environment
($LATENTCM_OPTIMUM_PYTHON, README "Run it elsewhere"); the test is skipped where there is none."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.cli import main

PROMPT = "on a grey backdrop, a blue star"
LEVEL = 1 / 255


def _needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'latentcm[onnx]')")


@pytest.fixture(scope="module")
def shipped_onnx(tmp_path_factory):
    _needs("onnx")
    _needs("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "lcm-onnx"
    main(["export", "--model", "lcm", "--out", str(out), "--format", "onnx"])
    return out


def _grid(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255  # [H, W * n, 3] in [0, 1]


def _generate(tmp_path, name, *args) -> np.ndarray:
    main(["generate", PROMPT, "--num-images", "2", "--seed", "3", "--out", str(tmp_path / name), *args])
    return _grid(tmp_path / name)


def test_export_has_optimums_layout(shipped_onnx):
    for part in ("unet", "text_encoder", "vae_encoder", "vae_decoder"):
        assert (shipped_onnx / part / "model.onnx").is_file() and (shipped_onnx / part / "config.json").is_file()
    for file in ("model_index.json", "sampling.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (shipped_onnx / file).is_file()
    import onnxruntime as ort

    unet = ort.InferenceSession(str(shipped_onnx / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in unet.get_inputs()}
    assert inputs["timestep"] == [] and inputs["sample"][0] == "batch_size"  # optimum's scalar timestep
    assert [o.name for o in unet.get_outputs()] == ["out_sample"]


OPTIMUM_SCRIPT = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTLatentConsistencyModelPipeline
folder, out, prompt, timesteps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
pipe = ORTLatentConsistencyModelPipeline.from_pretrained(folder, export=False, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
kw = {"timesteps": [int(t) for t in timesteps.split(",")]} if timesteps else {"num_inference_steps": 4}
images = pipe([prompt] * 2, guidance_scale=8.5, output_type="np", **kw,
              generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
np.save(out, np.concatenate(list(images), axis=1))  # side by side, as lcm generate's grid
"""


def _optimum_python() -> str:
    """A Python with optimum-onnx: this one, else $LATENTCM_OPTIMUM_PYTHON (optimum-onnx 0.1.0 needs
    transformers < 4.58, so it usually lives in its own environment: README "Run it elsewhere")."""
    try:
        import optimum.onnxruntime  # noqa: F401
        return sys.executable
    except ImportError:
        found = os.environ.get("LATENTCM_OPTIMUM_PYTHON")
        if not found:
            pytest.skip("optimum-onnx is not importable here and LATENTCM_OPTIMUM_PYTHON is unset")
        return found


def _optimum_images(folder, tmp_path, timesteps: list[int] | None) -> np.ndarray:
    out = tmp_path / "optimum.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # offline, and no latentcm on the path
    subprocess.run([_optimum_python(), "-c", OPTIMUM_SCRIPT, str(folder), str(out), PROMPT,
                    ",".join(map(str, timesteps or []))], check=True, env=env, timeout=600)
    return np.load(out)


def test_optimum_ort_pipeline_draws_lcm_generates_images(shipped_onnx, tmp_path):
    """optimum's own ORTLatentConsistencyModelPipeline, offline, same prompt / seeds / steps / guidance: within
    2/255 of the PNG `lcm generate` writes. The shipped LCM samples on its refine timesteps (sampling.json), which
    diffusers' LCMScheduler does not pick by itself, so optimum gets them explicitly (timesteps=)."""
    from latentcm.sampling.student import inference_timesteps
    from latentcm.schedules import train_timesteps

    ours = _generate(tmp_path, "torch.png")  # image i: seed 3 + i, 4 steps, g = 8.5 (the model's defaults)
    lcm = Bundle.load(registry.resolve("lcm"))
    assert lcm.timestep_schedule == "refine"
    timesteps = inference_timesteps("refine", 4, train_timesteps(lcm.scheduler_config), lcm.original_inference_steps)
    theirs = _optimum_images(shipped_onnx, tmp_path, timesteps.tolist())
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 2 * LEVEL
    grid = _optimum_images(shipped_onnx, tmp_path, None)  # diffusers' own pick of 4 grid timesteps
    assert np.abs(grid - ours).max() > 2 * LEVEL  # so the comparison above can fail


def test_generate_runtime_onnx_matches_torch(shipped_onnx, tmp_path):
    ours = _generate(tmp_path, "torch.png")
    onnx = _generate(tmp_path, "onnx.png", "--model", str(shipped_onnx), "--runtime", "onnx")
    assert np.abs(onnx - ours).max() <= LEVEL  # fp32 graphs: at most one 8-bit rounding apart


def test_any_lcm_folder_exports_and_samples_alike(micro_lcm, tmp_path):
    """A distilled micro LCM (not the shipped one), text-to-image and img2img, on ONNX Runtime and OpenVINO."""
    _needs("onnxruntime")
    from latentcm.bundle.runtime import load_runtime

    torch_bundle = Bundle.load(micro_lcm)
    init = torch_bundle.generate([PROMPT], [1], steps=2).clamp(-1, 1)
    formats = {"onnx": "onnxruntime"} | ({"openvino": "openvino"} if _importable("openvino") else {})
    for fmt in formats:
        main(["export", "--model", str(micro_lcm), "--out", str(tmp_path / fmt), "--format", fmt])
        runtime = load_runtime(tmp_path / fmt, fmt)
        for call in (lambda b: b.generate([PROMPT] * 2, [0, 1], steps=2),
                     lambda b: b.decode(b.img2img_latents([PROMPT], [2], init, strength=0.6, steps=2))):
            err = (call(runtime) - call(torch_bundle)).abs().max() / 2  # [-1, 1] -> [0, 1] units
            assert err < 0.05 * LEVEL, (fmt, float(err))


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_runtime_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def error(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["generate", PROMPT, "--out", str(tmp_path / "x.png"), *argv])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    assert "not an ONNX / OpenVINO export" in error("--runtime", "onnx")  # the shipped torch folder
    (tmp_path / "fake" / "unet").mkdir(parents=True)
    (tmp_path / "fake" / "unet" / "model.onnx").write_bytes(b"")
    assert "add --runtime onnx" in error("--model", str(tmp_path / "fake"))
    assert "--lora needs --runtime torch" in error("--model", str(tmp_path / "fake"), "--runtime", "onnx",
                                                   "--lora", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # the extra is not installed
    assert "pip install 'latentcm[onnx]'" in error("--model", str(tmp_path / "fake"), "--runtime", "onnx")
    with pytest.raises(SystemExit):
        main(["export", "--model", "lcm", "--out", str(tmp_path / "o"), "--format", "onnx", "--single-file"])
    assert "only with --format diffusers" in capsys.readouterr().err

