import torch

from latentcm import world
from latentcm.models import components as C
from latentcm.models.judge import Judge


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_micro_components_build_from_config():
    """What the micro preset builds: the configured sizes, a text encoder of the expected parameter count,
    components small enough for the test suite, seeded initialisation and working forward passes."""
    p = C.get_preset("micro")
    clip, tok = C.build_text_and_vision(p)
    vae, unet = C.build_vae(p), C.build_unet(p)
    enc = C.text_encoder_from_clip(clip)
    # configs
    assert tok.model_max_length == p.max_length and len(tok) == enc.config.vocab_size
    assert (enc.config.hidden_size, enc.config.num_hidden_layers, enc.config.num_attention_heads,
            enc.config.max_position_embeddings) == (p.text_hidden, p.text_layers, p.text_heads, p.max_length)
    assert (clip.config.vision_config.hidden_size, clip.config.vision_config.num_hidden_layers) == (
        p.vision_hidden, p.vision_layers)
    assert list(vae.config.block_out_channels) == list(p.vae_channels) and vae.config.latent_channels == 4
    assert vae.config.norm_num_groups == p.vae_groups
    assert list(unet.config.block_out_channels) == list(p.unet_channels)
    assert unet.config.cross_attention_dim == p.text_hidden and unet.config.sample_size == C.latent_size(p) == 16
    assert unet.config.time_cond_proj_dim is None and unet.config.norm_num_groups == p.unet_groups
    assert C.build_unet(p, time_cond_proj_dim=256).config.time_cond_proj_dim == 256
    # parameter counts: the CLIP text transformer exactly (embeddings, per layer attention + MLP + 2 norms, final
    # norm); the VAE and UNet small enough for CPU tests (the default preset's UNet has ~6.6 M)
    h, layers, vocab, pos = p.text_hidden, p.text_layers, len(tok), p.max_length
    per_layer = 4 * (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h
    assert _params(enc) == vocab * h + pos * h + layers * per_layer + 2 * h
    assert 10_000 < _params(vae) < 500_000 and 10_000 < _params(unet) < 500_000
    # seeded: the same seed builds the same weights, another seed others
    again, other = C.build_unet(p, seed=0).state_dict(), C.build_unet(p, seed=1).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in unet.state_dict().items())
    assert any(not torch.equal(v, other[k]) for k, v in unet.state_dict().items())
    # forward passes: text -> states, image -> latent -> image, and a UNet prediction that reads text and t
    ids = tok(["a red circle", "a blue square"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        text = enc(ids)[0]
        assert text.shape == (2, p.max_length, p.text_hidden) and not torch.allclose(text[0], text[1])
        z = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist.mode()
        assert z.shape == (2, 4, C.latent_size(p), C.latent_size(p))
        assert vae.decode(z).sample.shape == (2, 3, 64, 64)
        t = torch.tensor([10, 500])
        eps = unet(z, t, text).sample
        assert eps.shape == z.shape and torch.isfinite(eps).all()
        assert not torch.allclose(eps, unet(z, t, text.flip(0)).sample)   # reads the text
        assert not torch.allclose(eps, unet(z, t.flip(0), text).sample)   # reads the timestep


def test_default_preset_sizes():
    p = C.get_preset("default")
    assert C.latent_size(p) == 16  # f = 4 VAE on 64x64 images
    cfg = C.unet_config(p, p.text_hidden, 16)
    assert cfg["cross_attention_dim"] == p.text_hidden


def test_tokenizer_reads_world_words_and_unknown_words():
    tok = C.build_tokenizer(32)
    single = [w for w in world.vocabulary_words() if len(tok.tokenize(w)) == 1]
    assert len(single) >= 0.8 * len(world.vocabulary_words())
    pieces = tok.tokenize("a zebra")
    assert len(pieces) > 2  # unknown word falls back to byte pieces, no <unk>
    ids = tok("a zebra").input_ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a zebra"


def test_text_encoder_round_trips_through_save(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    clip, tok = C.build_text_and_vision(C.get_preset("micro"))
    enc = C.text_encoder_from_clip(clip)
    enc.save_pretrained(tmp_path / "te")
    tok.save_pretrained(tmp_path / "tok")
    enc2 = CLIPTextModel.from_pretrained(tmp_path / "te")
    tok2 = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok2(["a big blue star"], return_tensors="pt").input_ids
    assert torch.allclose(enc(ids)[0], enc2(ids)[0])
    # the text tower is the CLIP model's: same pooled output
    assert torch.allclose(clip.text_model(ids).pooler_output, enc(ids).pooler_output, atol=1e-6)


def test_judge_save_load_and_predict(tmp_path):
    judge = Judge(8).eval()
    judge.save(tmp_path / "j")
    again = Judge.load(tmp_path / "j")
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert judge.predict(x) == again.predict(x)
    assert judge.features(x).shape == (3, 256)
    assert set(judge.predict(x)[0]) == set(world.ATTRIBUTES)
