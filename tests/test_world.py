import functools
import random
import json

import numpy as np
import pytest

from latentcm import world


@functools.lru_cache(maxsize=None)
def _samples(seed: int, count: int, split: str = "train") -> tuple:
    """world.iter_samples as a tuple, drawn once per module (rendering thousands of images is this file's cost);
    read-only: tests take prefixes of it."""
    return tuple(world.iter_samples(seed, count, split))


@pytest.fixture(scope="module", autouse=True)
def _drop_samples():
    yield
    _samples.cache_clear()  # ~10k images: not kept for the rest of the session


def test_world_is_deterministic_per_seed():
    a = [world.make_sample(3, i) for i in range(20)]
    b = [world.make_sample(3, i) for i in range(20)]
    c = [world.make_sample(4, i) for i in range(20)]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.text == y.text for x, y in zip(a, b))
    assert any(x.text != z.text or x.scene != z.scene for x, z in zip(a, c))


@pytest.mark.parametrize("split", ["train", "heldout", "paraphrase"])
def test_every_caption_parses_back_to_its_attributes(split):
    for s in _samples(0, 3000 if split == "train" else 2000, split)[:2000]:
        parsed = world.parse_caption(s.text)
        assert {"shape", "colour"} <= parsed.keys(), s.text
        assert all(s.scene.attributes()[k] == v for k, v in parsed.items()), (s.text, parsed)


def test_captions_use_synonyms_and_omit_attributes():
    texts = [s.text for s in _samples(0, 3000)]
    assert any("grey" in t for t in texts) and any("gray" in t for t in texts)
    assert any(t.count(" ") <= 2 for t in texts)  # "a red circle"
    assert any("backdrop" in t for t in texts) and any("upper left" in t for t in texts)
    assert world.parse_caption("red circle, big, upper left, grey backdrop") == {
        "colour": "red", "background": "gray", "shape": "circle", "size": "large", "position": "top left"}


def test_heldout_split_is_disjoint_from_training():
    train = list(_samples(0, 3000, "train"))
    held = list(_samples(0, 2000, "heldout")[:500])
    triple = lambda s: (s.scene.shape, s.scene.colour, s.scene.background)  # noqa: E731
    assert not {triple(s) for s in train} & {triple(s) for s in held}
    assert not set(world.TRAIN_TEMPLATES) & (set(world.HELDOUT_TEMPLATES) | set(world.PARAPHRASE_TEMPLATES))
    train_texts = {s.text for s in train}
    assert not {s.text for s in held} & train_texts
    assert all(s.scene.colour != s.scene.background for s in train + held)


def _words(templates):
    return {w for t in templates for w in t.replace(",", " ").replace(":", " ").split() if "{" not in w}


def test_heldout_templates_reuse_training_words_and_paraphrases_do_not():
    train = _words(world.TRAIN_TEMPLATES)
    assert _words(world.HELDOUT_TEMPLATES) <= train
    assert _words(world.PARAPHRASE_TEMPLATES) - train  # e.g. "against", "with", "picture"
    para = list(_samples(0, 2000, "paraphrase")[:300])
    held = {(s.scene.shape, s.scene.colour, s.scene.background) for s in _samples(0, 2000, "heldout")[:300]}
    assert {(s.scene.shape, s.scene.colour, s.scene.background) for s in para} <= held | {
        (a, b, c) for a in world.SHAPES for b in world.COLOUR_NAMES for c in world.COLOUR_NAMES
        if world.is_heldout_triple(a, b, c)}


def test_all_attribute_values_are_drawn():
    scenes = [s.scene for s in _samples(1, 3000)]
    for key, values in world.ATTRIBUTES.items():
        assert {getattr(s, key) for s in scenes} == set(values), key


def test_rendering_is_anti_aliased_and_uses_the_named_colours():
    s = world.make_sample(0, 0)
    arr = np.asarray(s.image).reshape(-1, 3)
    assert s.image.size == (64, 64)
    assert tuple(arr[0]) == world.COLOURS[s.scene.background]  # a corner pixel is background
    bg, fg = np.array(world.COLOURS[s.scene.background]), np.array(world.COLOURS[s.scene.colour])
    is_bg = (arr == bg).all(1)
    is_fg = (arr == fg).all(1)
    assert is_fg.sum() > 10 and (~is_bg & ~is_fg).sum() > 0  # blended edge pixels exist


def test_export_imagefolder(tmp_path):
    out = world.export_imagefolder(tmp_path / "ds", seed=0, count=5, split="heldout")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert (out / row["file_name"]).is_file()
        assert {"text", "shape", "colour", "background", "size", "position"} <= row.keys()


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        world.make_sample(0, 0, "test")


def test_training_captions_vary_phrase_order_but_never_use_a_heldout_template():
    rng = random.Random(0)
    drawn = [world.compose_template(rng) for _ in range(4000)]
    assert set(drawn) <= set(world.TRAIN_TEMPLATES)
    reserved = {t.replace(",", "") for t in world.HELDOUT_TEMPLATES + world.PARAPHRASE_TEMPLATES}
    assert not {t.replace(",", "") for t in world.TRAIN_TEMPLATES} & reserved
    with_bg = [t for t in drawn if "{bg}" in t]
    bg_first = sum(t.index("{bg}") < t.index("{shape}") for t in with_bg) / len(with_bg)
    assert 0.35 < bg_first < 0.65  # the background is named first about as often as the object
