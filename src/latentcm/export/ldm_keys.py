"""Weight names of the original Stable Diffusion checkpoint (CompVis latent-diffusion, the layout A1111,
ComfyUI and diffusers' ``from_single_file`` read) for diffusers / transformers state dicts, both ways.

    UNet          model.diffusion_model.*   conv_in -> input_blocks.0.0, down block b layer j ->
                                            input_blocks.{1 + b (L + 1) + j}, its downsampler -> input_blocks.{.. + L}.0.op,
                                            mid_block -> middle_block.{0,1,2}, up block b layer j ->
                                            output_blocks.{b (L + 1) + j}, time_embedding -> time_embed.{0,2},
                                            conv_norm_out / conv_out -> out.{0,2}   (L = layers_per_block)
    VAE           first_stage_model.*       down_blocks.i -> down.i.block, up_blocks.i -> up.{n - 1 - i}.block,
                                            mid_block -> mid.block_{1,2} / mid.attn_1 (1x1-conv attention weights)
    text encoder  cond_stage_model.transformer.text_model.*   SD-1.x CLIP: transformers' names below the prefix

The maps are built from each component's config (any block count and ``layers_per_block``), so every key is
renamed by rule and read back by the same rule; a key no rule covers is reported, never guessed.
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}

Blocks = dict[str, tuple[str, dict[str, str]]]  # diffusers prefix -> (LDM prefix, renames below the prefix)


def unet_blocks(config: dict) -> Blocks:
    """The SD-1.x/2.x UNet's block prefixes (diffusers -> LDM) for a ``UNet2DConditionModel`` config."""
    n_layers = config["layers_per_block"]
    if not isinstance(n_layers, int):
        raise ValueError(f"layers_per_block {n_layers!r} differs per block; the LDM layout has one count")
    blocks: Blocks = {"conv_in.": ("input_blocks.0.0.", {}), "time_embedding.linear_1.": ("time_embed.0.", {}),
                      "time_embedding.linear_2.": ("time_embed.2.", {}), "conv_norm_out.": ("out.0.", {}),
                      "conv_out.": ("out.2.", {}), "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET),
                      "mid_block.attentions.0.": ("middle_block.1.", {}),
                      "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET)}
    for b in range(len(config["down_block_types"])):
        first = 1 + b * (n_layers + 1)
        for j in range(n_layers):
            blocks[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{first + j}.0.", UNET_RESNET)
            blocks[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{first + j}.1.", {})
        blocks[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{first + n_layers}.0.op.", {})
    for b, kind in enumerate(config["up_block_types"]):
        first = b * (n_layers + 1)
        for j in range(n_layers + 1):
            blocks[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{first + j}.0.", UNET_RESNET)
            blocks[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{first + j}.1.", {})
        slot = 2 if "CrossAttn" in kind else 1  # the upsampler follows the attention when there is one
        blocks[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{first + n_layers}.{slot}.conv.", {})
    return blocks


def vae_blocks(config: dict) -> Blocks:
    """The ``AutoencoderKL``'s block prefixes (diffusers -> LDM); the decoder's up blocks run in reverse order."""
    n = len(config["block_out_channels"])
    blocks: Blocks = {f"{part}.{name}.": (f"{part}.{name}.", {}) for part in ("encoder", "decoder")
                      for name in ("conv_in", "conv_out")}
    blocks.update({"quant_conv.": ("quant_conv.", {}), "post_quant_conv.": ("post_quant_conv.", {})})
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
        for k in range(2):
            blocks[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", VAE_RESNET)
    for i in range(n):
        blocks[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", VAE_RESNET)
        blocks[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        blocks[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{n - 1 - i}.block.", VAE_RESNET)
        blocks[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{n - 1 - i}.upsample.conv.", {})
    return blocks


def _inner(rest: str, renames: dict[str, str]) -> str:
    """``rest`` with its leading name renamed (a resnet's ``norm1.weight`` -> ``in_layers.0.weight``); VAE resnet
    keys keep their layer index first (``0.conv_shortcut.weight``)."""
    head, _, tail = rest.partition(".") if rest.split(".")[0].isdigit() else ("", "", rest)
    for old, new in renames.items():
        if tail.startswith(old):
            tail = new + tail[len(old):]
            break
    return f"{head}.{tail}" if head else tail


def ldm_name(key: str, blocks: Blocks) -> str | None:
    """The LDM name of a diffusers key under the longest matching block prefix; None when no block covers it."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in blocks:
            ldm_prefix, renames = blocks[prefix]
            return ldm_prefix + _inner(key[len(prefix):], renames)
    return None


def text_name(key: str) -> str:
    """The SD-1.x checkpoint name of a transformers ``CLIPTextModel`` key (flattened since transformers 5, or
    under ``text_model.`` before)."""
    return TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)


def is_conv_attention(ldm_key: str) -> bool:
    """The VAE attention projections the LDM checkpoint stores as 1x1 convolutions ([C, C, 1, 1])."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def to_ldm(state: dict[str, torch.Tensor], blocks: Blocks | None, prefix: str) -> tuple[dict, list[str]]:
    """(LDM-named tensors, the keys no rule covers) for one component's state dict; ``blocks`` None: the text
    encoder's rule. Attention projections become 1x1 convolutions where the LDM layout has them."""
    out, unmapped = {}, []
    for key, value in state.items():
        name = text_name(key) if blocks is None else ldm_name(key, blocks)
        if name is None:
            unmapped.append(key)
            continue
        full = name if blocks is None else prefix + name
        out[full] = value[:, :, None, None] if is_conv_attention(full) and value.ndim == 2 else value
    return out, unmapped


def from_ldm(tensors: dict[str, torch.Tensor], module: torch.nn.Module, blocks: Blocks | None, prefix: str,
             skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``module``'s state dict read back from LDM-named ``tensors`` (the inverse of ``to_ldm``); ``skip``: the
    module's keys the LDM layout lacks. KeyError names the first missing tensor."""
    state = {}
    for key, param in module.state_dict().items():
        if key in skip:
            continue
        name = text_name(key) if blocks is None else prefix + ldm_name(key, blocks)
        if name not in tensors:
            raise KeyError(f"{name} (for {key})")
        state[key] = tensors[name].reshape(param.shape)
    return state
