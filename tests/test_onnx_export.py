"""`lcm export --format onnx|openvino` and `lcm generate --runtime onnx|openvino`: optimum's own
ORTLatentConsistencyModelPipeline loads the export offline and draws lcm generate's images; latentcm's runtime
runs the graphs with its own sampler and matches the torch model.

optimum-onnx 0.1.0 pins transformers < 4.58, which cannot load latentcm's models (transformers 5 writes CLIP
weights without the ``text_model.`` prefix), so optimum runs in a subprocess of its own environment
($LATENTCM_OPTIMUM_PYTHON; optimum-intel's OpenVINO pipeline: $LATENTCM_OPTIMUM_INTEL_PYTHON; README "Run it
elsewhere"); each test is skipped where there is none."""
import json
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
import importlib, json, sys, numpy as np, torch
module, name, load, folder, out, prompt, timesteps, g = sys.argv[1:9]
pipe = getattr(importlib.import_module(module), name).from_pretrained(folder, export=False, local_files_only=True,
                                                                      **json.loads(load))
pipe.set_progress_bar_config(disable=True)
kw = {"timesteps": [int(t) for t in timesteps.split(",")]} if timesteps else {"num_inference_steps": 4}
images = pipe([prompt] * 2, guidance_scale=float(g), output_type="np", **kw,
              generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
np.save(out, np.concatenate(list(images), axis=1))  # side by side, as lcm generate's grid
"""
PIPELINES = {  # format -> (module, class, the variable naming a Python that has it, from_pretrained keywords)
    "onnx": ("optimum.onnxruntime", "ORTLatentConsistencyModelPipeline", "LATENTCM_OPTIMUM_PYTHON", {}),
    # f32: on CPUs with bf16 units OpenVINO computes in bf16 by default, beyond 2/255 of torch here
    "openvino": ("optimum.intel", "OVLatentConsistencyModelPipeline", "LATENTCM_OPTIMUM_INTEL_PYTHON",
                 {"ov_config": {"INFERENCE_PRECISION_HINT": "f32"}}),
}


def _peer_python(fmt: str) -> str:
    """A Python with optimum's pipeline for ``fmt``: this one, else the one its variable names (optimum-onnx 0.1.0
    needs transformers < 4.58, so it lives in an environment of its own: docs/run-elsewhere.md)."""
    module, _, variable, _ = PIPELINES[fmt]
    try:
        __import__(module)
        return sys.executable
    except ImportError:
        if not os.environ.get(variable):
            pytest.skip(f"{module} is not importable here and {variable} is unset")
        return os.environ[variable]


def _peer_images(fmt: str, folder, tmp_path, timesteps: list[int] | None) -> np.ndarray:
    module, name, _, load = PIPELINES[fmt]
    out = tmp_path / f"{fmt}.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # offline, and no latentcm on the path
    subprocess.run([_peer_python(fmt), "-c", OPTIMUM_SCRIPT, module, name, json.dumps(load), str(folder), str(out),
                    PROMPT, ",".join(map(str, timesteps or [])), str(Bundle.load(registry.resolve("lcm")).defaults[2])],
                   check=True, env=env, timeout=600)
    return np.load(out)


def _check_peer_draws_lcm_generates_images(fmt: str, folder, tmp_path):
    """optimum's pipeline for ``fmt``, offline, same prompt / seeds / steps / guidance: within 2/255 of the PNG
    `lcm generate` writes. The shipped LCM samples on its refine timesteps (sampling.json), which diffusers'
    LCMScheduler does not pick by itself, so optimum gets them explicitly (timesteps=)."""
    from latentcm.sampling.student import inference_timesteps
    from latentcm.schedules import train_timesteps

    _peer_python(fmt)  # skips before any work when there is none
    ours = _generate(tmp_path, "torch.png")  # image i: seed 3 + i, 4 steps, the model's default g
    lcm = Bundle.load(registry.resolve("lcm"))
    assert lcm.timestep_schedule == "refine"
    timesteps = inference_timesteps("refine", 4, train_timesteps(lcm.scheduler_config), lcm.original_inference_steps)
    theirs = _peer_images(fmt, folder, tmp_path, timesteps.tolist())
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 2 * LEVEL
    grid = _peer_images(fmt, folder, tmp_path, None)  # diffusers' own pick of 4 grid timesteps
    assert np.abs(grid - ours).max() > 2 * LEVEL  # so the comparison above can fail


def test_optimum_ort_pipeline_draws_lcm_generates_images(shipped_onnx, tmp_path):
    _check_peer_draws_lcm_generates_images("onnx", shipped_onnx, tmp_path)


def test_optimum_intel_ov_pipeline_draws_lcm_generates_images(tmp_path):
    _needs("openvino")
    _peer_python("openvino")
    main(["export", "--model", "lcm", "--out", str(tmp_path / "lcm-openvino"), "--format", "openvino"])
    _check_peer_draws_lcm_generates_images("openvino", tmp_path / "lcm-openvino", tmp_path)


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
    assert "onnx cannot load it" in error("--model", str(tmp_path / "fake"), "--runtime", "onnx")  # empty graph
    assert "--lora needs --runtime torch" in error("--model", str(tmp_path / "fake"), "--runtime", "onnx",
                                                   "--lora", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # the extra is not installed
    assert "pip install 'latentcm[onnx]'" in error("--model", str(tmp_path / "fake"), "--runtime", "onnx")
    with pytest.raises(SystemExit):
        main(["export", "--model", "lcm", "--out", str(tmp_path / "o"), "--format", "onnx", "--single-file"])
    assert "only with --format diffusers" in capsys.readouterr().err



def test_serve_runtime_onnx_answers_like_torch(shipped_onnx):
    from latentcm.errors import ModelError
    from latentcm.serve.service import ServeConfig, Service
    from latentcm.serve.validate import parse_request

    def images(config):
        service = Service(config)
        try:
            request = parse_request({"prompt": PROMPT, "seed": 3, "num_images": 2, "steps": 2}, service.limits)
            return np.stack(service.generate(request, 120).images).astype(int)
        finally:
            service.close()
    onnx = images(ServeConfig(lcm=str(shipped_onnx), teacher=None, runtime="onnx", warmup=False))
    torch_ = images(ServeConfig(lcm="lcm", teacher=None, warmup=False))
    assert np.abs(onnx - torch_).max() <= 2
    with pytest.raises(ModelError, match="takes no bf16"):
        Service(ServeConfig(lcm=str(shipped_onnx), teacher=None, runtime="onnx", dtype="bf16", warmup=False))
