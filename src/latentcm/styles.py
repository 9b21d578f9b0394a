"""A second procedural domain for fine-tuning: the shapes world drawn in a style it never has.

Objects are filled with diagonal stripes (the object colour alternating with a darker or, for dark
colours, lighter shade of it) and the captions gain the style word "striped" before the shape
("a red striped circle on a blue background"). Everything else (shapes, colours, sizes, positions,
caption language) is the base world's, so a model that adapts keeps its attribute accuracy while
taking on the style: the analogue of the paper's Pokémon and Simpsons fine-tuning sets.

The custom set is split 90/10 at random (by index) into ``train`` and ``heldout`` parts, as the
paper's LCF sets are; both use training attribute triples and composed captions.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from . import world
from .files import write_text

STYLE_WORD = "striped"
STYLE_SPLITS = ("train", "heldout")
STRIPE_PERIOD = 12  # pixels at 64x64 (one light and one dark band); 8 is too fine for the f=4 VAE


def stripe_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second band colour: 55% of the colour for bright colours, 45% toward white for dark ones."""
    if sum(rgb) / 3 < 90:
        return tuple(int(round(c + 0.45 * (255 - c))) for c in rgb)
    return tuple(int(round(0.55 * c)) for c in rgb)


def _stripe_weights(resolution: int) -> np.ndarray:
    """[H, W, 1] anti-aliased weight of the second band (diagonal stripes)."""
    side = resolution * world.SUPERSAMPLE
    y, x = np.mgrid[0:side, 0:side]
    band = (((x + y) // (STRIPE_PERIOD * world.SUPERSAMPLE // 2)) % 2).astype(np.float32)
    return band.reshape(resolution, world.SUPERSAMPLE, resolution, world.SUPERSAMPLE).mean(axis=(1, 3))[..., None]


def render_striped(scene: world.Scene, resolution: int = world.RESOLUTION) -> Image.Image:
    """The scene with its object filled by diagonal stripes (the background is untouched)."""
    plain = np.asarray(world.render(scene, resolution), dtype=np.float32)
    dark = np.asarray(world.render(scene, resolution, fill=stripe_colour(world.COLOURS[scene.colour])),
                      dtype=np.float32)
    w = _stripe_weights(resolution)
    return Image.fromarray(np.round(plain * (1 - w) + dark * w).astype(np.uint8))


def styled_caption(scene: world.Scene, rng: random.Random) -> str:
    """A composed training-language caption with the style word before the shape."""
    template = world.compose_template(rng).replace("{shape}", STYLE_WORD + " {shape}")
    return world.caption(scene, rng, (template,))


def has_style(text: str) -> bool:
    return STYLE_WORD in text.lower().replace(",", " ").split()


def make_styled_sample(seed: int, index: int, split: str = "train") -> world.Sample:
    """The ``index``-th sample of the striped set's ``split``: a pure function of its inputs."""
    if split not in STYLE_SPLITS:
        raise ValueError(f"unknown split {split!r} of the striped set; use one of {', '.join(STYLE_SPLITS)}")
    rng = random.Random(world._stable_hash(seed, STYLE_WORD, split, index))
    scene = world.sample_scene(rng, "train")
    return world.Sample(render_striped(scene), styled_caption(scene, rng), scene)


def export_styled(out_dir: str | Path, seed: int, count: int, split: str = "train") -> Path:
    """Write the striped set as an image folder (PNGs + metadata.jsonl, with a ``style`` column)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        s = make_styled_sample(seed, i, split)
        name = f"{STYLE_WORD}_{split}_{i:06d}.png"
        s.image.save(out / name)
        lines.append(json.dumps({"file_name": name, "text": s.text, "style": STYLE_WORD, **s.scene.attributes()}))
    write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out
