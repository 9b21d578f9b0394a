import time

import torch

from latentcm import world
from latentcm.models import components as C
from latentcm.models.judge import Judge


def test_micro_components_build_from_config_in_seconds():
    t0 = time.time()
    p = C.get_preset("micro")
    clip, tok = C.build_text_and_vision(p)
    vae, unet = C.build_vae(p), C.build_unet(p)
    assert time.time() - t0 < 10
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    text = C.text_encoder_from_clip(clip)(ids)[0]
    assert text.shape == (1, p.max_length, p.text_hidden)
    z = vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (2, 4, C.latent_size(p), C.latent_size(p))
    eps = unet(z, torch.tensor([10, 500]), text.expand(2, -1, -1)).sample
    assert eps.shape == z.shape


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
