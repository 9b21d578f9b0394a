"""`--single-file`: the original Stable Diffusion checkpoint layout, read by diffusers' own single-file loader."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentcm.bundle import Bundle
from latentcm.errors import ModelError
from latentcm.export import ldm_keys
from latentcm.export.single_file import (COND_PROJ, EXTRA_PREFIX, FORMAT, OLD_FORMAT, bake_guidance,
                                         load_single_file, save_single_file)

PROMPTS = ["a red circle on a blue background", "a small green square"]
MICRO_UNET = {"layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
SD15_UNET = {"layers_per_block": 2, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}


@pytest.mark.parametrize("config, key, ldm", [
    (MICRO_UNET, "down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
    (MICRO_UNET, "down_blocks.0.downsamplers.0.conv.weight", "input_blocks.2.0.op.weight"),
    (MICRO_UNET, "down_blocks.1.attentions.0.proj_in.weight", "input_blocks.3.1.proj_in.weight"),
    (MICRO_UNET, "mid_block.resnets.1.time_emb_proj.bias", "middle_block.2.emb_layers.1.bias"),
    (MICRO_UNET, "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.1.2.conv.weight"),
    (MICRO_UNET, "up_blocks.1.resnets.1.conv_shortcut.weight", "output_blocks.3.0.skip_connection.weight"),
    (MICRO_UNET, "time_embedding.linear_2.bias", "time_embed.2.bias"),
    (MICRO_UNET, "conv_out.weight", "out.2.weight"),
    # Stable Diffusion 1.5's own names (its checkpoint's last block is output_blocks.11, upsamplers at .1/.2)
    (SD15_UNET, "down_blocks.0.downsamplers.0.conv.bias", "input_blocks.3.0.op.bias"),
    (SD15_UNET, "down_blocks.3.resnets.1.conv2.weight", "input_blocks.11.0.out_layers.3.weight"),
    (SD15_UNET, "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    (SD15_UNET, "up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
    (SD15_UNET, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
     "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"),
    (SD15_UNET, "up_blocks.3.resnets.2.conv_shortcut.weight", "output_blocks.11.0.skip_connection.weight"),
])
def test_unet_names_by_hand(config, key, ldm):
    assert ldm_keys.ldm_name(key, ldm_keys.unet_blocks(config)) == ldm


@pytest.mark.parametrize("key, ldm", [
    ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
    ("encoder.down_blocks.0.downsamplers.0.conv.bias", "encoder.down.0.downsample.conv.bias"),
    ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
    ("encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"),
    ("decoder.mid_block.resnets.1.norm2.weight", "decoder.mid.block_2.norm2.weight"),
    ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.2.upsample.conv.weight"),
    ("decoder.up_blocks.2.resnets.1.conv1.weight", "decoder.up.0.block.1.conv1.weight"),
    ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
    ("post_quant_conv.bias", "post_quant_conv.bias"),
])
def test_vae_names_by_hand(key, ldm):
    assert ldm_keys.ldm_name(key, ldm_keys.vae_blocks({"block_out_channels": [16, 32, 32]})) == ldm


def test_text_encoder_and_unknown_names():
    assert ldm_keys.text_name("encoder.layers.0.mlp.fc1.weight") == \
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert ldm_keys.text_name("text_model.final_layer_norm.bias") == \
        "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    assert ldm_keys.ldm_name(COND_PROJ, ldm_keys.unet_blocks(MICRO_UNET)) is None


def _tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(sample_size=8, block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=4,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                  cross_attention_dim=8, attention_head_dim=2)
    return UNet2DConditionModel(**{**config, **overrides})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a)


@pytest.mark.parametrize("overrides", [{}, dict(layers_per_block=1, block_out_channels=[8, 8, 16])])
def test_diffusers_converter_reads_our_unet_names_back(overrides):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _tiny_unet(**overrides)
    ldm, unmapped = ldm_keys.to_ldm(unet.state_dict(), ldm_keys.unet_blocks(dict(unet.config)), ldm_keys.UNET_PREFIX)
    assert not unmapped and all(k.startswith("model.diffusion_model.") for k in ldm)
    assert _same(unet.state_dict(), convert_ldm_unet_checkpoint(ldm, dict(unet.config)))


@pytest.mark.parametrize("mid_attention", [True, False])
def test_diffusers_converter_reads_our_vae_names_back(mid_attention):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=4,
                        mid_block_add_attention=mid_attention)
    ldm, unmapped = ldm_keys.to_ldm(vae.state_dict(), ldm_keys.vae_blocks(dict(vae.config)), ldm_keys.VAE_PREFIX)
    assert not unmapped
    if mid_attention:  # the LDM checkpoint's attention projections are 1x1 convolutions
        assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert _same(vae.state_dict(), convert_ldm_vae_checkpoint(ldm, dict(vae.config)))


def test_bake_guidance_is_the_time_embedding_at_that_w():
    from latentcm.guidance import guidance_scale_embedding

    unet = _tiny_unet(time_cond_proj_dim=16).eval()
    t_emb = torch.randn(3, 8)
    cond = guidance_scale_embedding(torch.full((3,), 4.0), 16)  # w = 4 <-> g = 5
    baked = _tiny_unet().eval()
    baked.load_state_dict(bake_guidance(unet.state_dict(), 5.0))
    with torch.no_grad():
        want, got = unet.time_embedding(t_emb, cond), baked.time_embedding(t_emb)
        other = unet.time_embedding(t_emb, guidance_scale_embedding(torch.full((3,), 1.0), 16))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (other - want).abs().max() > 1e-3


def _images(pipe, guidance):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(7),
                output_type="np").images


@pytest.fixture(scope="module")
def lcm(micro_lcm):
    """The micro LCM with a w projection strong enough that the guidance scale changes its images (two
    distillation steps leave it near its zero start)."""
    bundle = Bundle.load(micro_lcm)
    torch.manual_seed(0)
    with torch.no_grad():
        bundle.unet.time_embedding.cond_proj.weight.normal_(0.0, 0.5)
    return bundle


@pytest.fixture(scope="module")
def single_file(lcm, tmp_path_factory):
    return save_single_file(lcm, tmp_path_factory.mktemp("single") / "lcm.safetensors", guidance=8.5)


def test_diffusers_from_single_file_samples_like_the_folder(lcm, micro_lcm, single_file):
    """diffusers' loader, offline, the folder only as config: the LCM's images at g = 8.5 within 0.1/255 (float32
    rounding of the baked bias; measured about 1e-4/255); at another g they differ, so the test can fail."""
    from diffusers import StableDiffusionPipeline

    from latentcm.export.release import lcm_pipeline

    with safe_open(str(single_file), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == FORMAT and f.metadata()["guidance_scale"] == "8.5"
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model", "latentcm"}
    assert "model.diffusion_model.output_blocks.3.0.skip_connection.weight" in keys
    pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(micro_lcm), local_files_only=True,
                                                    time_cond_proj_dim=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim is None
    folder = lcm_pipeline(lcm)  # diffusers' LatentConsistencyModelPipeline over the same modules
    ours = _images(pipe, 1.0)  # the guidance is in the weights: no classifier-free guidance on top
    assert abs(ours - _images(folder, 8.5)).max() <= 0.1 / 255
    assert abs(ours - _images(folder, 2.0)).max() > 1 / 255


def test_our_reader_restores_the_w_conditioned_lcm(lcm, single_file):
    src, restored = lcm, load_single_file(single_file)
    for part in ("unet", "vae", "text_encoder"):
        assert _same(getattr(src, part).state_dict(), getattr(restored, part).state_dict()), part
    assert restored.is_lcm and restored.scheduler_config == src.scheduler_config
    assert restored.sampling_file() == src.sampling_file()  # schedule, guidance mode and default g ride along


def test_old_latentcm_single_files_still_load(micro_lcm, single_file, tmp_path):
    src = Bundle.load(micro_lcm)
    with safe_open(str(single_file), framework="pt") as f:
        meta = {**f.metadata(), "format": OLD_FORMAT}
    old = {f"{part}.{k}": v.contiguous() for part in ("unet", "vae", "text_encoder")
           for k, v in getattr(src, part).state_dict().items()}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    assert _same(src.unet.state_dict(), load_single_file(tmp_path / "old.safetensors").unet.state_dict())


def test_a_file_without_the_guidance_tensors_is_one_line(single_file, tmp_path):
    with safe_open(str(single_file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(EXTRA_PREFIX)}
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ModelError, match="guidance embedding"):
        load_single_file(tmp_path / "cut.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelError, match="not a latentcm single file"):
        load_single_file(tmp_path / "plain.safetensors")
