"""ONNX and OpenVINO folders of an LCM, in the layout optimum's ``ORTLatentConsistencyModelPipeline``
(``optimum-onnx``) and ``OVLatentConsistencyModelPipeline`` (``optimum-intel``) load: one network per folder
(``unet``, ``text_encoder``, ``vae_encoder``, ``vae_decoder``) as ``model.onnx`` (OpenVINO:
``openvino_model.xml`` + ``.bin``) beside its ``config.json``, plus ``tokenizer/``, ``scheduler/``,
``model_index.json`` and latentcm's ``sampling.json``.

The networks are traced with ``torch.onnx.export`` under the input / output names and dynamic axes of
optimum's exporter configs (``UNetOnnxConfig``, ``CLIPTextOnnxConfig``, ``VaeEncoderOnnxConfig``,
``VaeDecoderOnnxConfig``; the timestep a scalar, the VAE encoder returning the posterior's parameters).
optimum's own exporter is not called: ``optimum-onnx`` 0.1.0 needs transformers < 4.58, which cannot
be installed beside the transformers latentcm runs on.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..bundle import SAMPLING_FILE, Bundle
from ..bundle.loading import read_config
from ..errors import ModelError
from ..files import write_json
from .pipeline import write_sampling_settings
from .release import _check_dest, unguided_note

FORMATS = ("onnx", "openvino")
OPSET = 17
ONNX_FILE = "model.onnx"                # optimum.onnxruntime's ONNX_WEIGHTS_NAME
OPENVINO_FILE = "openvino_model.xml"    # optimum.intel's OV_XML_FILE_NAME
BATCH, SEQ = "batch_size", "sequence_length"


class _UNet(torch.nn.Module):
    """(sample, scalar timestep, encoder_hidden_states, timestep_cond) -> out_sample, as optimum's UNet export."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _VaeEncoder(torch.nn.Module):
    """sample -> latent_parameters: the posterior's mean and log-variance, concatenated on channels."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _graphs(bundle: Bundle, batch: int = 2) -> dict[str, tuple]:
    """{part: (module, example inputs, input names, output names, dynamic axes)} in optimum's names."""
    unet, vae, text = bundle.unet.config, bundle.vae.config, bundle.text_encoder.config
    f, side = bundle.vae_factor, unet.sample_size
    seq = bundle.tokenizer.model_max_length
    ids = torch.zeros(batch, seq, dtype=torch.long)
    image, latent = (torch.randn(batch, 3, side * f, side * f), torch.randn(batch, vae.latent_channels, side, side))
    unet_args = (torch.randn(batch, unet.in_channels, side, side), torch.tensor(500.0),
                 torch.randn(batch, seq, text.hidden_size), torch.randn(batch, unet.time_cond_proj_dim))
    hw = {0: BATCH, 2: "height", 3: "width"}
    return {
        "unet": (_UNet(bundle.unet), unet_args, ["sample", "timestep", "encoder_hidden_states", "timestep_cond"],
                 ["out_sample"], {"sample": hw, "encoder_hidden_states": {0: BATCH, 1: SEQ},
                                  "timestep_cond": {0: BATCH}, "out_sample": hw}),
        "text_encoder": (_TextEncoder(bundle.text_encoder), (ids,), ["input_ids"],
                         ["last_hidden_state", "pooler_output"],
                         {"input_ids": {0: BATCH, 1: SEQ}, "last_hidden_state": {0: BATCH, 1: SEQ},
                          "pooler_output": {0: BATCH}}),
        "vae_encoder": (_VaeEncoder(bundle.vae), (image,), ["sample"], ["latent_parameters"],
                        {"sample": {0: BATCH, 2: "sample_height", 3: "sample_width"},
                         "latent_parameters": {0: BATCH, 2: f"sample_height / {f}", 3: f"sample_width / {f}"}}),
        "vae_decoder": (_VaeDecoder(bundle.vae), (latent,), ["latent_sample"], ["sample"],
                        {"latent_sample": {0: BATCH, 2: "latent_height", 3: "latent_width"},
                         "sample": {0: BATCH, 2: f"latent_height * {f}", 3: f"latent_width * {f}"}}),
    }


def export_graph(module: torch.nn.Module, args: tuple, file: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict) -> Path:
    """One network traced to ``file`` (TorchScript-based ``torch.onnx.export``, as optimum's exporter)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on static shapes
        torch.onnx.export(module.eval(), args, str(file), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return file


def _write_configs(source: Path, dest: Path) -> None:
    """Each network's config.json, the tokenizer, the scheduler, model_index.json and sampling.json."""
    for part, config in (("unet", "unet"), ("text_encoder", "text_encoder"), ("vae_encoder", "vae"),
                         ("vae_decoder", "vae")):
        write_json(dest / part / "config.json", read_config(source / config / "config.json"))
    for folder in ("tokenizer", "scheduler"):
        shutil.copytree(source / folder, dest / folder)
    index = read_config(source / "model_index.json")
    # tokenizer.json only (no vocab.json / merges.txt): transformers 4.x reads it through the fast class
    index["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
    write_json(dest / "model_index.json", index)


def _to_openvino(dest: Path) -> None:
    """Each ``model.onnx`` converted to OpenVINO IR (``openvino_model.xml`` + ``.bin``) in its place."""
    try:
        import openvino as ov
    except ImportError:
        raise ModelError("--format openvino needs openvino: pip install 'latentcm[openvino]'") from None
    for file in sorted(dest.glob(f"*/{ONNX_FILE}")):
        ov.save_model(ov.convert_model(str(file)), str(file.with_name(OPENVINO_FILE)), compress_to_fp16=False)
        file.unlink()


def export_onnx(source: str | Path, dest: str | Path, *, fmt: str = "onnx",
                progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write an LCM folder ``source`` as an ONNX (``fmt="onnx"``) or OpenVINO (``"openvino"``) pipeline folder.

    Args:
        source: a diffusers LCM folder (LCMScheduler + UNet with ``time_cond_proj_dim``), e.g. the shipped ``lcm``.
        dest: a new (or empty) folder; written via a temporary sibling, so it appears complete or not at all.
        fmt: "onnx" (ONNX Runtime, ``ORTLatentConsistencyModelPipeline``) or "openvino"
            (``OVLatentConsistencyModelPipeline``).
        progress: called with one line per step written.

    Returns:
        ``dest``.
    """
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError:
        raise ModelError(f"--format {fmt} needs onnx: pip install 'latentcm[onnx]'") from None
    source, dest = Path(source), Path(dest)
    bundle = Bundle.load(source)
    if not bundle.is_lcm or bundle.is_sdxl or bundle.unet.config.get("time_cond_proj_dim") is None:
        raise ModelError(f"{source} is not a Stable Diffusion LCM (LCMScheduler + UNet with a w embedding); "
                         "--format onnx|openvino exports those only")
    _check_dest(source, dest)
    progress(f"loaded the LCM {source}")
    tmp = dest.parent / f".{dest.name}.export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for part, (module, args, inputs, outputs, axes) in _graphs(bundle).items():
        progress(f"tracing {part} to {part}/{ONNX_FILE}")
        export_graph(module, args, tmp / part / ONNX_FILE, inputs, outputs, axes)
    if fmt == "openvino":
        progress(f"converting each network to OpenVINO IR ({OPENVINO_FILE})")
        _to_openvino(tmp)
    progress(f"writing the configs, tokenizer/, scheduler/, model_index.json and {SAMPLING_FILE}")
    _write_configs(source, tmp)
    write_sampling_settings(tmp, bundle.sampling_file())
    if (line := unguided_note(bundle)) is not None:
        progress(line)
    if dest.exists():
        dest.rmdir()
    tmp.replace(dest)
    return dest
