"""SDXL as a conditioning adapter of the one denoiser interface.

An SDXL UNet (``addition_embed_type="text_time"``) takes, besides the prompt states, two added
conditions: the pooled prompt embedding of the second text encoder (``text_embeds`` [B, P]) and the
micro-conditioning ``time_ids`` [B, 6] = (original h, w, crop top, left, target h, w). Everything
downstream of the encoders (LCD data cache, [cond; uncond] batching in the solver target, the
samplers) handles ONE conditioning tensor, so the three are packed into it:

    cond = [prompt_embeds [B, L, D]; extra row [B, 1, D]],  extra row = [pooled (P) | time_ids (6) | 0 ...]

``unet_forward`` unpacks it for a text_time UNet and passes ``added_cond_kwargs``; for any other UNet
(SD 1.x / 2.x) it is the plain ``unet(z, t, encoder_hidden_states=cond, timestep_cond=w_emb)`` call.
P is read from the UNet config: projection_class_embeddings_input_dim - 6 * addition_time_embed_dim
(SDXL base layout; the refiner's 5 aesthetic-score ids are not supported).

Prompt encoding follows diffusers' ``StableDiffusionXLPipeline.encode_prompt``: penultimate hidden states
of both encoders concatenated on the feature axis, pooled output of encoder 2; the unconditional branch is
all zeros (prompt and pooled; time_ids kept) when ``force_zeros_for_empty_prompt`` (SDXL's default and the
diffusers SDXL LCD scripts' choice), else the encoding of "".
"""
from __future__ import annotations

import torch

TEXT_TIME = "text_time"
NUM_TIME_IDS = 6  # original_size (2) + crops_coords_top_left (2) + target_size (2)


def is_text_time(unet_config) -> bool:
    """True for an SDXL-style UNet (pooled text + time_ids as added conditions)."""
    return unet_config is not None and unet_config.get("addition_embed_type") == TEXT_TIME


def pooled_dim(unet_config) -> int:
    """P, the pooled-embedding size a text_time UNet expects."""
    p = unet_config["projection_class_embeddings_input_dim"] - NUM_TIME_IDS * unet_config["addition_time_embed_dim"]
    if p <= 0:
        raise ValueError(f"bad SDXL UNet config: projection_class_embeddings_input_dim "
                         f"{unet_config['projection_class_embeddings_input_dim']} leaves no room for pooled text")
    return p


def time_ids(height: int, width: int, batch: int = 1, crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL micro-conditioning [B, 6]: (h, w) original, crop top-left, (h, w) target, as the pipeline's default."""
    return torch.tensor([[height, width, *crop, height, width]], dtype=torch.float32).repeat(batch, 1)


def pack_condition(prompt_embeds: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(prompt_embeds [B, L, D], pooled [B, P], time_ids [B, 6]) -> cond [B, L + 1, D]."""
    b, _, d = prompt_embeds.shape
    p, n = pooled.shape[-1], ids.shape[-1]
    if p + n > d:
        raise ValueError(f"cannot pack pooled ({p}) + time_ids ({n}) into a row of {d} features")
    row = prompt_embeds.new_zeros(b, 1, d)  # [B, 1, D]
    row[:, 0, :p] = pooled.to(row.dtype)
    row[:, 0, p:p + n] = ids.to(row.device, row.dtype)
    return torch.cat([prompt_embeds, row], dim=1)  # [B, L + 1, D]


def unpack_condition(cond: torch.Tensor, unet_config) -> tuple[torch.Tensor, dict]:
    """cond [B, L + 1, D] -> (prompt_embeds [B, L, D], {"text_embeds": [B, P], "time_ids": [B, 6]})."""
    p = pooled_dim(unet_config)
    row = cond[:, -1]  # [B, D]
    return cond[:, :-1], {"text_embeds": row[:, :p], "time_ids": row[:, p:p + NUM_TIME_IDS]}


def unet_forward(unet, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, timestep_cond=None):
    """The UNet's output object for (z, t, cond, w_emb); the one place that knows SD from SDXL conditioning."""
    config = getattr(unet, "config", None)
    if is_text_time(config):
        states, added = unpack_condition(cond, config)
        return unet(z, t, encoder_hidden_states=states, timestep_cond=timestep_cond, added_cond_kwargs=added)
    return unet(z, t, encoder_hidden_states=cond, timestep_cond=timestep_cond)


@torch.no_grad()
def encode_prompts(text_encoders, tokenizers, prompts: list[str], ids: torch.Tensor) -> torch.Tensor:
    """Packed SDXL conditioning [B, L + 1, D] of prompts (diffusers ``StableDiffusionXLPipeline.encode_prompt``).

    Args:
        text_encoders: (CLIPTextModel, CLIPTextModelWithProjection).
        tokenizers: their tokenizers.
        prompts: B prompts.
        ids: time_ids [B, 6] (or [1, 6], broadcast).
    """
    states, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        input_ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = enc(input_ids.to(enc.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's pooled (projected) output [B, P]
        states.append(out.hidden_states[-2])  # penultimate layer [B, L, D_i]
    embeds = torch.cat(states, dim=-1)  # [B, L, D_1 + D_2]
    return pack_condition(embeds, pooled, ids.expand(len(prompts), -1))


@torch.no_grad()
def encode_uncond(text_encoders, tokenizers, n: int, ids: torch.Tensor, force_zeros: bool = True) -> torch.Tensor:
    """The unconditional branch [n, L + 1, D]: zero prompt and pooled embeddings (time_ids kept) when
    ``force_zeros`` (SDXL), else the encoding of the empty prompt."""
    if not force_zeros:
        return encode_prompts(text_encoders, tokenizers, [""] * n, ids)
    enc1, enc2 = text_encoders
    length = tokenizers[0].model_max_length
    embeds = torch.zeros(n, length, enc1.config.hidden_size + enc2.config.hidden_size, device=enc2.device)
    pooled = torch.zeros(n, enc2.config.projection_dim, device=enc2.device)
    return pack_condition(embeds, pooled, ids.expand(n, -1))


# --- tiny SDXL components built from configs (tests; no downloads) -------------------------------

def build_tiny_pipeline(preset_name: str = "micro", seed: int = 0, prediction_type: str = "epsilon",
                        addition_time_embed_dim: int = 8, text_layers: int = 2):
    """A tiny ``StableDiffusionXLPipeline``: two tiny CLIP text encoders (the second with projection),
    byte-level tokenizers, a text_time UNet and the micro VAE; the SDXL EulerDiscreteScheduler config with
    Stable Diffusion's betas."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from . import components as C

    preset = C.get_preset(preset_name)
    tok = C.build_tokenizer(preset.max_length)
    vocab = tok.get_vocab()
    text_cfg = {**C.text_config(preset, len(vocab), vocab[C.SPECIAL_BOS], vocab[C.SPECIAL_EOS]),
                "num_hidden_layers": text_layers}
    torch.manual_seed(seed)
    enc1 = CLIPTextModel(CLIPTextConfig(**text_cfg)).eval()
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)).eval()
    proj = enc2.config.projection_dim
    unet_cfg = {**C.unet_config(preset, 2 * preset.text_hidden, C.latent_size(preset)),
                "addition_embed_type": TEXT_TIME, "addition_time_embed_dim": addition_time_embed_dim,
                "projection_class_embeddings_input_dim": proj + NUM_TIME_IDS * addition_time_embed_dim}
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = C.build_vae(preset, seed=seed)
    vae.register_to_config(scaling_factor=0.5)
    sched = EulerDiscreteScheduler(**{k: v for k, v in C.noise_scheduler_config().items()
                                      if k not in ("clip_sample", "set_alpha_to_one")},
                                   timestep_spacing="leading")
    sched.register_to_config(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok,
                                     tokenizer_2=C.build_tokenizer(preset.max_length), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
