"""Sample an exported ONNX / OpenVINO LCM folder (``export.onnx``) with latentcm's own sampler.

``load_runtime(folder, "onnx" | "openvino")`` returns a ``Bundle`` whose UNet, VAE and text encoder are thin
modules over ONNX Runtime sessions or OpenVINO compiled models, so ``Bundle.generate`` (timesteps, seeds, the
per-image noise streams, img2img) runs exactly as on the torch folder: only the networks change.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from .. import offline  # noqa: F401
from ..errors import ModelError, one_line
from . import Bundle
from .loading import read_config, sampling_settings

RUNTIMES = ("torch", "onnx", "openvino")
ONNX_FILE, OPENVINO_FILE = "model.onnx", "openvino_model.xml"
PARTS = ("unet", "text_encoder", "vae_encoder", "vae_decoder")
Runner = Callable[[dict], list]  # {input name: np.ndarray} -> outputs in the graph's order


def _onnx_runner(file: Path, threads: int | None = None) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: shared CPUs
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    types = {i.name: np.int64 if "int64" in i.type else np.float32 for i in session.get_inputs()}
    return lambda feeds: session.run(None, {k: v.astype(types[k], copy=False) for k, v in feeds.items()})


def _openvino_runner(file: Path, threads: int | None = None) -> Runner:
    import openvino as ov

    # f32 inference: on CPUs with bf16 units OpenVINO's default precision would be bf16
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(str(file), "CPU", config)
    return lambda feeds: [np.asarray(v) for v in compiled(feeds).values()]


def _runner(folder: Path, part: str, runtime: str, threads: int | None = None) -> Runner:
    """The part's network on ``runtime``: OpenVINO takes its IR when exported so, else the ONNX graph."""
    graph, ir = folder / part / ONNX_FILE, folder / part / OPENVINO_FILE
    try:
        if runtime == "openvino" and (ir.is_file() or graph.is_file()):
            return _openvino_runner(ir if ir.is_file() else graph, threads)
        if runtime == "onnx" and graph.is_file():
            return _onnx_runner(graph, threads)
    except Exception as exc:  # the runtimes' own errors (a truncated or foreign graph) have no common type
        raise ModelError(f"{folder / part}: {runtime} cannot load it: {one_line(exc)}") from None
    hint = ": an OpenVINO export, use --runtime openvino" if ir.is_file() else ""
    raise ModelError(f"{folder / part} holds no {ONNX_FILE if runtime == 'onnx' else OPENVINO_FILE}{hint}")


class _Network(torch.nn.Module):
    """A runtime graph as a module: ``config`` from the part's config.json; float32 on the CPU."""

    def __init__(self, run: Runner, config: dict):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.run, self.config = run, FrozenDict(config)
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # device and dtype for the samplers

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def outputs(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in self.run({k: v.cpu().numpy() for k, v in feeds.items()})]


class RuntimeUNet(_Network):
    """(sample, t [B] or scalar, encoder_hidden_states, timestep_cond) -> .sample, one timestep per call."""

    def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, **unused):
        t = torch.as_tensor(timestep).reshape(-1)
        if (t != t[0]).any():
            raise ModelError("an exported UNet takes one timestep per call, as optimum's export")
        return SimpleNamespace(sample=self.outputs(sample=sample, timestep=t[0].float(), timestep_cond=timestep_cond,
                                                   encoder_hidden_states=encoder_hidden_states)[0])


class RuntimeTextEncoder(_Network):
    def forward(self, input_ids):
        return tuple(self.outputs(input_ids=input_ids))  # (last_hidden_state, pooler_output)


class RuntimeVae(_Network):
    """``encode(x).latent_dist`` and ``decode(z).sample`` over the two VAE graphs."""

    def __init__(self, encoder: Runner, decoder: Runner, config: dict):
        super().__init__(decoder, config)
        self.encoder = encoder

    def decode(self, latent_sample):
        return SimpleNamespace(sample=self.outputs(latent_sample=latent_sample)[0])

    def encode(self, sample):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        parameters = torch.from_numpy(np.asarray(self.encoder({"sample": sample.cpu().numpy()})[0]))
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(parameters))


def is_export(folder: str | Path) -> bool:
    """True for a folder written by ``export.onnx`` (a UNet graph in ONNX or OpenVINO IR)."""
    unet = Path(folder) / "unet"
    return (unet / ONNX_FILE).is_file() or (unet / OPENVINO_FILE).is_file()


def _import(runtime: str) -> None:
    module = {"onnx": "onnxruntime", "openvino": "openvino"}[runtime]
    try:
        __import__(module)
    except ImportError:
        raise ModelError(f"--runtime {runtime} needs {module}: pip install 'latentcm[{runtime}]'") from None


def load_runtime(folder: str | Path, runtime: str = "onnx", threads: int | None = None) -> Bundle:
    """A ``Bundle`` over an exported folder's graphs on ``runtime`` ("onnx": ONNX Runtime, "openvino"), each
    network on ``threads`` CPU threads (None: the runtime's default)."""
    if runtime not in RUNTIMES[1:]:
        raise ModelError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES[1:])}")
    folder = Path(folder)
    if not is_export(folder):
        raise ModelError(f"{folder} is not an ONNX / OpenVINO export (no unet/{ONNX_FILE}); make one with "
                         f"lcm export --format {runtime} --model {folder} --out DIR")
    _import(runtime)
    from transformers import CLIPTokenizerFast

    runners = {part: _runner(folder, part, runtime, threads) for part in PARTS}
    configs = {part: read_config(folder / part / "config.json") for part in PARTS}
    vae = RuntimeVae(runners["vae_encoder"], runners["vae_decoder"], configs["vae_decoder"])
    bundle = Bundle(RuntimeUNet(runners["unet"], configs["unet"]), vae,
                    RuntimeTextEncoder(runners["text_encoder"], configs["text_encoder"]),
                    CLIPTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True),
                    read_config(folder / "scheduler" / "scheduler_config.json"), folder)
    return bundle.use_sampling(sampling_settings(folder))  # the export's sampling defaults (SAMPLING_FILE)
