"""The shapes world: a seeded procedural generator of captioned 64x64 images.

One object per image. Every sample is a pure function of ``(seed, index)``, so a
dataset never has to be stored to be reproduced. Captions come from several
templates with synonyms and may omit attributes; :func:`parse_caption` reads a
caption back into the attributes it mentions.

Splits:
    ``train``      -- training templates, triples (shape, colour, background) not held out.
    ``heldout``    -- held-out templates *and* held-out triples; reserved for evaluation.
    ``paraphrase`` -- held-out triples in templates made of words no training caption has
                      (a stress test of generalisation beyond the training vocabulary).
"""
from __future__ import annotations

import itertools
import json
import math
import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_path, write_text

RESOLUTION = 64
SUPERSAMPLE = 4  # render at 4x and downsample with a box filter = anti-aliasing

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.14, "medium": 0.2, "large": 0.26}  # radius as a fraction of the side
SIZE_NAMES = tuple(SIZES)
POSITIONS = {
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
POSITION_NAMES = tuple(POSITIONS)
ATTRIBUTES = {
    "shape": SHAPES, "colour": COLOUR_NAMES, "background": COLOUR_NAMES,
    "size": SIZE_NAMES, "position": POSITION_NAMES,
}
JITTER = 0.05  # position jitter, fraction of the side

# Synonyms: canonical value -> words that may stand for it in a caption.
SYNONYMS = {
    "shape": {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc"), "cross": ("cross", "plus")},
    "colour": {c: (c,) for c in COLOUR_NAMES} | {"gray": ("gray", "grey")},
    "size": {"small": ("small", "little", "tiny"), "medium": ("medium", "mid-sized"),
             "large": ("large", "big")},
    "position": {p: (p,) for p in POSITION_NAMES} | {
        "top left": ("top left", "upper left"), "top right": ("top right", "upper right"),
        "bottom left": ("bottom left", "lower left"), "bottom right": ("bottom right", "lower right"),
        "center": ("center", "middle"), "top": ("top",), "bottom": ("bottom",)},
}
BACKGROUND_WORDS = ("background", "backdrop")

# Training captions are composed from phrases in a random order (the object first as often as
# the background or the position first), so that the text encoder learns to read each phrase
# rather than a fixed word order. {bg} is always followed by a background word, which is how
# the parser tells the background colour from the object colour.
OBJECT_FORMS = ("a {colour} {shape}", "{colour} {shape}", "{shape}, {colour}")
SIZED_OBJECT_FORMS = ("a {size} {colour} {shape}", "{size} {colour} {shape}")
SIZE_FORMS = ("{size}",)
POSITION_FORMS = ("in the {position}", "{position}")
BACKGROUND_FORMS = ("on a {bg} {bgword}", "on {bg} {bgword}", "{bg} {bgword}")
# Probability that a training caption mentions each optional attribute.
MENTION = {"size": 0.5, "position": 0.5, "background": 0.75}
# Held-out templates put the training words in orders no training caption uses. They add no
# new words: a word that never occurs in training has an untrained token embedding, and a
# prompt built on it would measure that, not whether the model reads.
HELDOUT_TEMPLATES = (
    "{bg} {bgword}, a {size} {colour} {shape} in the {position}",
    "on a {bg} {bgword}, a {colour} {shape}",
    "{colour} {shape} on a {bg} {bgword}, {size}, {position}",
)
# A harder stress set: held-out triples described with words that never occur in training.
PARAPHRASE_TEMPLATES = (
    "an image of a {colour} {shape} against a {bg} {bgword}",
    "{bg} {bgword} with a {size} {colour} {shape} at the {position}",
    "picture: {colour} {shape} in the {position}, {bg} {bgword}",
)
SPLITS = ("train", "heldout", "paraphrase")

def _unpunctuated(template: str) -> str:
    return template.replace(",", "")


def _join(phrases: list[str], spaced: list[bool]) -> str:
    """Join phrases with ", " or (before an "on"/"in" phrase, where ``spaced``) a plain space."""
    out = phrases[0]
    for phrase, space in zip(phrases[1:], spaced):
        out += (" " if space and phrase.startswith(("on ", "in ")) else ", ") + phrase
    return out


def _is_reserved(template: str) -> bool:
    """Held-out and paraphrase templates never occur in training, whatever the punctuation."""
    return _unpunctuated(template) in {_unpunctuated(t) for t in HELDOUT_TEMPLATES + PARAPHRASE_TEMPLATES}


def _phrase_sets() -> Iterator[list[str]]:
    for size_mode in ("none", "sized", "separate"):
        objects = SIZED_OBJECT_FORMS if size_mode == "sized" else OBJECT_FORMS
        for obj in objects:
            for pos in (None,) + POSITION_FORMS:
                for bg in (None,) + BACKGROUND_FORMS:
                    phrases = [obj] + (["{size}"] if size_mode == "separate" else [])
                    yield phrases + [p for p in (pos, bg) if p]


def _all_training_templates() -> tuple[str, ...]:
    found: set[str] = set()
    for phrases in _phrase_sets():
        for order in itertools.permutations(phrases):
            for spaced in itertools.product((False, True), repeat=len(order) - 1):
                found.add(_join(list(order), list(spaced)))
    return tuple(sorted(t for t in found if not _is_reserved(t)))


# Every template compose_template can return (for tests, the vocabulary and diagnostics).
TRAIN_TEMPLATES = _all_training_templates()


def compose_template(rng: random.Random) -> str:
    """Draw a training caption template: which attributes to mention, their phrasing and order."""
    while True:
        phrases = []
        size = rng.random() < MENTION["size"]
        if size and rng.random() < 0.5:
            phrases.append(rng.choice(SIZED_OBJECT_FORMS))
        else:
            phrases.append(rng.choices(OBJECT_FORMS, weights=(0.45, 0.4, 0.15))[0])
            phrases += ["{size}"] if size else []
        if rng.random() < MENTION["position"]:
            phrases.append(rng.choice(POSITION_FORMS))
        if rng.random() < MENTION["background"]:
            phrases.append(rng.choice(BACKGROUND_FORMS))
        rng.shuffle(phrases)
        template = _join(phrases, [rng.random() < 0.6 for _ in phrases[1:]])
        if not _is_reserved(template):
            return template
HELDOUT_TRIPLE_FRACTION = 0.1


@dataclass(frozen=True)
class Scene:
    """The attributes of one image, plus the jittered geometry that renders it."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    cx: float  # centre, fraction of the side
    cy: float
    angle: float  # rotation in degrees (shapes with symmetry keep their name)

    def attributes(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ATTRIBUTES}


def _stable_hash(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def is_heldout_triple(shape: str, colour: str, background: str) -> bool:
    """True for the ~10% of (shape, colour, background) triples never used in training."""
    return _stable_hash("heldout", shape, colour, background) % 1000 < HELDOUT_TRIPLE_FRACTION * 1000


def _triples(split: str) -> list[tuple[str, str, str]]:
    want = split != "train"
    return [(s, c, b) for s in SHAPES for c in COLOUR_NAMES for b in COLOUR_NAMES
            if c != b and is_heldout_triple(s, c, b) == want]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """Draw one scene; its (shape, colour, background) triple belongs to ``split``."""
    _check_split(split)
    shape, colour, background = rng.choice(_triples(split))
    size, position = rng.choice(SIZE_NAMES), rng.choice(POSITION_NAMES)
    px, py = POSITIONS[position]
    cx, cy = px + rng.uniform(-JITTER, JITTER), py + rng.uniform(-JITTER, JITTER)
    return Scene(shape, colour, background, size, position, cx, cy, rng.uniform(-12, 12))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(math.radians(45 + 90 * i)) * r, math.sin(math.radians(45 + 90 * i)) * r)
               for i in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * i)) * r, math.sin(math.radians(-90 + 120 * i)) * r)
               for i in range(3)]
        pts = [(x, y + 0.15 * r) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -r), (0.65 * r, 0), (0, r), (-0.65 * r, 0)]
    elif shape == "star":
        pts = [(math.cos(math.radians(-90 + 36 * i)) * (r if i % 2 == 0 else 0.45 * r),
                math.sin(math.radians(-90 + 36 * i)) * (r if i % 2 == 0 else 0.45 * r))
               for i in range(10)]
    elif shape == "cross":
        a, b = r, 0.33 * r
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a),
               (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(shape)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render(scene: Scene, resolution: int = RESOLUTION, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Render a scene as an anti-aliased RGB image (supersampled, box-filtered); ``fill``
    overrides the object's RGB colour."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * side, scene.cy * side, SIZES[scene.size] * side
    fill = COLOURS[scene.colour] if fill is None else fill
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=COLOURS[scene.background])
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, scene.angle), fill=fill)
    return img.resize((resolution, resolution), Image.BOX)


def caption(scene: Scene, rng: random.Random, templates: tuple[str, ...] | None = None) -> str:
    """Describe a scene with random synonyms and a template drawn from ``templates``, or
    composed by :func:`compose_template` when ``templates`` is None (training captions)."""
    template = compose_template(rng) if templates is None else rng.choice(templates)
    words = {key: rng.choice(SYNONYMS[key][getattr(scene, key)])
             for key in ("shape", "colour", "size", "position")}
    words["bg"] = rng.choice(SYNONYMS["colour"][scene.background])
    words["bgword"] = rng.choice(BACKGROUND_WORDS)
    return template.format(**words)


def templates_for(split: str) -> tuple[str, ...] | None:
    """The caption templates of a split; None for training, whose captions are composed."""
    _check_split(split)
    return {"train": None, "heldout": HELDOUT_TEMPLATES, "paraphrase": PARAPHRASE_TEMPLATES}[split]


def _lookup(kind: str) -> list[tuple[str, str]]:
    """(phrase, canonical) pairs, longest phrase first so 'top left' wins over 'top'."""
    pairs = [(w, canon) for canon, words in SYNONYMS[kind].items() for w in words]
    return sorted(pairs, key=lambda p: -len(p[0]))


def parse_caption(text: str) -> dict[str, str]:
    """Read the attributes a caption mentions (the inverse of :func:`caption`)."""
    tokens = text.lower().replace(",", " ").replace(":", " ").split()
    out: dict[str, str] = {}
    colour_words = dict((w, c) for w, c in _lookup("colour"))
    for i, tok in enumerate(tokens):
        if tok in colour_words:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            key = "background" if nxt in BACKGROUND_WORDS else "colour"
            out.setdefault(key, colour_words[tok])
    joined = " " + " ".join(tokens) + " "
    for kind in ("shape", "size", "position"):
        for phrase, canon in _lookup(kind):
            if f" {phrase} " in joined:
                out[kind] = canon
                joined = joined.replace(f" {phrase} ", " ", 1)
                break
    return out


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    text: str
    scene: Scene


def make_sample(seed: int, index: int, split: str = "train") -> Sample:
    """The ``index``-th sample of the world with ``seed``: a pure function of its inputs."""
    rng = random.Random(_stable_hash(seed, split, index))
    scene = sample_scene(rng, split)
    return Sample(render(scene), caption(scene, rng, templates_for(split)), scene)


def iter_samples(seed: int, count: int, split: str = "train", start: int = 0) -> Iterator[Sample]:
    for i in range(start, start + count):
        yield make_sample(seed, i, split)


def images_array(samples: list[Sample]) -> np.ndarray:
    """Stack sample images as uint8 [N, H, W, 3]."""
    return np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])


def export_imagefolder(out_dir: str | Path, seed: int, count: int, split: str = "train") -> Path:
    """Write PNGs plus ``metadata.jsonl`` (Hugging Face imagefolder convention)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(iter_samples(seed, count, split)):
        name = f"{split}_{i:06d}.png"
        s.image.save(out / name)
        lines.append(json.dumps({"file_name": name, "text": s.text, **s.scene.attributes(),
                                 "geometry": {k: v for k, v in asdict(s.scene).items()
                                              if k in ("cx", "cy", "angle")}}))
    write_text(out / "metadata.jsonl", "\n".join(lines) + "\n")
    return out


def _sample_row(s) -> dict:
    return {"text": s.text, **s.scene.attributes(),
            "geometry": {k: v for k, v in asdict(s.scene).items() if k in ("cx", "cy", "angle")}}


def export_shards(out_dir: str | Path, seed: int, count: int, split: str = "train", shard_size: int = 1000) -> Path:
    """Write webdataset tar shards ``000000.tar``, ... of ``shard_size`` samples: ``{key}.png``, ``{key}.txt``
    (the caption) and ``{key}.json`` (its attributes, as ``export_imagefolder``'s metadata rows). Each shard is
    written under a temporary name, then renamed; members carry mtime 0, so the bytes depend on the arguments only."""
    import io
    import tarfile

    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    samples = iter_samples(seed, count, split)
    for shard, start in enumerate(range(0, count, shard_size)):
        final = out / f"{shard:06d}.tar"
        with atomic_path(final) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + shard_size, count)):
                s, key = next(samples), f"{split}_{i:06d}"
                png = io.BytesIO()
                s.image.save(png, format="PNG")
                add(tar, f"{key}.png", png.getvalue())
                add(tar, f"{key}.txt", s.text.encode())
                add(tar, f"{key}.json", json.dumps(_sample_row(s)).encode())
    return out


def vocabulary_words() -> list[str]:
    """Every word a caption of the world can contain (for building the tokenizer)."""
    words = set(BACKGROUND_WORDS)
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES + PARAPHRASE_TEMPLATES:
        words.update(w for w in template.replace(",", " ").replace(":", " ").split() if "{" not in w)
    for table in SYNONYMS.values():
        for phrases in table.values():
            for phrase in phrases:
                words.update(phrase.split())
    return sorted(words)
