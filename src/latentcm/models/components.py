"""Tiny Stable-Diffusion-architecture components built from configs (no downloads).

Every generator component is a standard diffusers / transformers class, so a folder
saved from them loads with ``StableDiffusionPipeline.from_pretrained`` and no code of
ours. Sizes come from named presets: ``micro`` for tests (built in well under a
second), ``default`` for the shipped offline model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import offline  # noqa: F401  (sets the Hugging Face offline switches)
from .. import world

SPECIAL_BOS, SPECIAL_EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """Sizes of one family of tiny components."""

    vae_channels: tuple[int, ...]
    vae_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    max_length: int
    vision_hidden: int
    vision_layers: int
    unet_channels: tuple[int, ...]
    unet_heads: int
    unet_groups: int
    judge_width: int


PRESETS = {
    "micro": Preset((16, 32, 32), 8, 32, 1, 2, 32, 32, 1, (32, 32), 2, 8, 8),
    "default": Preset((32, 64, 64), 16, 64, 3, 4, 32, 64, 3, (64, 128, 128), 8, 32, 32),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


# --- tokenizer -------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_files(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """A CLIP byte-level BPE vocabulary whose merges spell out the world's words.

    The vocabulary holds all 256 byte symbols (alone and word-final), so unknown words
    still tokenize, byte by byte. Merges build each known word left to right.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(vocab_list)
    byte_map = _bytes_to_unicode()
    for word in words if words is not None else world.vocabulary_words():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        left = chars[0]
        for ch in chars[1:]:
            merged = left + ch
            if merged not in seen:
                merges.append(f"{left} {ch}")
                vocab_list.append(merged)
                seen.add(merged)
            left = merged
    vocab_list += [SPECIAL_BOS, SPECIAL_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                        model_max_length=max_length)
    return tok


# --- configs ---------------------------------------------------------------------

def text_config(preset: Preset, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=preset.text_hidden,
                intermediate_size=4 * preset.text_hidden, num_hidden_layers=preset.text_layers,
                num_attention_heads=preset.text_heads, max_position_embeddings=preset.max_length,
                projection_dim=preset.text_hidden, bos_token_id=bos_id, eos_token_id=eos_id,
                pad_token_id=eos_id, hidden_act="quick_gelu")


def vision_config(preset: Preset) -> dict:
    return dict(hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
                num_hidden_layers=preset.vision_layers, num_attention_heads=4,
                image_size=world.RESOLUTION, patch_size=8, projection_dim=preset.text_hidden,
                hidden_act="quick_gelu")


def vae_config(preset: Preset) -> dict:
    n = len(preset.vae_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=list(preset.vae_channels), layers_per_block=1,
                norm_num_groups=preset.vae_groups, sample_size=world.RESOLUTION,
                mid_block_add_attention=False, scaling_factor=1.0)


def unet_config(preset: Preset, cross_attention_dim: int, latent_size: int,
                time_cond_proj_dim: int | None = None) -> dict:
    """Attention only at the two coarser resolutions: 16x16 self-attention costs the most
    on CPU and colour/shape conditioning is global enough for 8x8 and 4x4 cross-attention."""
    n = len(preset.unet_channels)
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
    up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
    return dict(sample_size=latent_size, in_channels=4, out_channels=4,
                block_out_channels=list(preset.unet_channels), layers_per_block=1,
                down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
                attention_head_dim=preset.unet_heads, norm_num_groups=preset.unet_groups,
                time_cond_proj_dim=time_cond_proj_dim)


# --- builders --------------------------------------------------------------------

def build_text_and_vision(preset: Preset, seed: int = 0):
    """A tiny CLIP (text + vision towers) and its tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = build_tokenizer(preset.max_length)
    vocab = tok.get_vocab()
    cfg = CLIPConfig(text_config=text_config(preset, len(vocab), vocab[SPECIAL_BOS], vocab[SPECIAL_EOS]),
                     vision_config=vision_config(preset), projection_dim=preset.text_hidden)
    torch.manual_seed(seed)
    return CLIPModel(cfg), tok


def text_encoder_from_clip(clip):
    """Cut the text tower out of a CLIPModel as the standard CLIPTextModel."""
    from transformers import CLIPTextModel

    enc = CLIPTextModel(clip.config.text_config)
    enc.load_state_dict(clip.text_model.state_dict())
    return enc.eval().requires_grad_(False)


def build_vae(preset: Preset, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config(preset))


def latent_size(preset: Preset) -> int:
    return world.RESOLUTION // 2 ** (len(preset.vae_channels) - 1)


def build_unet(preset: Preset, seed: int = 0, time_cond_proj_dim: int | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(preset, preset.text_hidden, latent_size(preset),
                                              time_cond_proj_dim))


def noise_scheduler_config() -> dict:
    """Stable Diffusion's training schedule (DDIM settings as SD ships them)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(preset: str = "micro", prediction_type: str = "epsilon", seed: int = 0):
    """An untrained StableDiffusionPipeline built from configs (tests, smoke runs): our components
    with a DDIM scheduler predicting ``prediction_type`` (epsilon | v_prediction | sample)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    p = get_preset(preset)
    clip, tok = build_text_and_vision(p, seed=seed)
    vae = build_vae(p, seed=seed)
    vae.register_to_config(scaling_factor=0.5)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder_from_clip(clip), tokenizer=tok, unet=build_unet(p, seed=seed),
        scheduler=DDIMScheduler(**{**noise_scheduler_config(), "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def encode_text(text_encoder, tokenizer, prompts: list[str]):
    """Prompts -> last hidden states [B, L, D], padded to the tokenizer's length, as SD conditions its UNet."""
    import torch

    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]
