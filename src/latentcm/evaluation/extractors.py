"""Feature extractors that turn images (and captions) into what ``metrics`` consumes.

Defaults are offline and in-domain:

* ``JudgeExtractor``: the independent judge (trained on real world images only, never a generator's
  conditioning). Its penultimate features feed FID; its class probabilities of the attributes a
  caption names give the CLIP-score analogue (``metrics.attribute_agreement``). We use the judge
  rather than a second tiny CLIP because it reads every attribute the captions can name and is
  already independent of the text encoder that conditions the generator: a score computed with
  that text encoder would reward the generator for agreeing with itself.
* ``HFClipScorer``: a real CLIP (transformers ``CLIPModel``) from a local folder, for users who
  have one (e.g. openai/clip-vit-base-patch32 downloaded beforehand).
* ``InceptionExtractor``: Inception-v3 pool features through torch-fidelity / torchmetrics, the
  standard FID backbone. Needs torchvision, which this project's CPU torch build cannot import, so
  it is optional: constructing it without the packages raises a one-line ``ImportError``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import world
from ..images import to_pixels
from ..models.judge import Judge


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def file_version(path: str | Path, length: int = 12) -> str:
    """A short content hash of a weights file (names caches after the model that made them)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]


class JudgeExtractor:
    """FID features and caption agreement from the judge. Images: [N, 3, 64, 64] in [-1, 1]."""

    name = "judge"

    def __init__(self, judge: Judge, version: str = "unversioned", batch_size: int = 256):
        self.judge, self.version, self.batch_size = judge, version, batch_size

    @classmethod
    def load(cls, folder: str | Path) -> "JudgeExtractor":
        return cls(Judge.load(folder), file_version(Path(folder) / "judge.safetensors"))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """[N, FEATURE_DIM] penultimate activations."""
        return torch.cat([self.judge.features(b.float()) for b in _batches(images, self.batch_size)]).numpy()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """attribute -> [N, K] softmax probabilities."""
        parts = [{k: v.softmax(-1) for k, v in self.judge(b.float()).items()}
                 for b in _batches(images, self.batch_size)]
        return {k: torch.cat([p[k] for p in parts]).numpy() for k in world.ATTRIBUTES}

    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        return self.predict_from(self.probabilities(images))

    @staticmethod
    def predict_from(probs: dict[str, np.ndarray]) -> list[dict[str, str]]:
        """Per image, attribute -> the most probable value."""
        n = len(next(iter(probs.values())))
        return [{k: world.ATTRIBUTES[k][int(probs[k][i].argmax())] for k in probs} for i in range(n)]


def wanted_indices(captions: list[str]) -> list[dict[str, int]]:
    """Per caption, attribute -> class index of each attribute it names."""
    return [{k: world.ATTRIBUTES[k].index(v) for k, v in world.parse_caption(c).items()} for c in captions]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _projected(output) -> torch.Tensor:
    """Projected embeddings from get_*_features: a tensor (transformers 4) or an output whose
    pooler_output holds them (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipScorer:
    """Image and text embeddings from a transformers ``CLIPModel`` + ``CLIPTokenizer`` in a local folder."""

    name = "clip"

    def __init__(self, folder: str | Path, batch_size: int = 64):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model in {folder} (expected config.json, weights and a tokenizer)")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.batch_size = batch_size

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([_projected(self.model.get_image_features(pixel_values=self._pixels(b)))
                          for b in _batches(images, self.batch_size)]).numpy()

    @torch.no_grad()
    def text_embeds(self, captions: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(captions), self.batch_size):
            ids = self.tokenizer(captions[i:i + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            out.append(_projected(self.model.get_text_features(input_ids=ids.input_ids,
                                                               attention_mask=ids.attention_mask)))
        return torch.cat(out).numpy()


class InceptionExtractor:
    """Inception-v3 2048-d pool features (standard FID), via torchmetrics' wrapper of torch-fidelity."""

    name = "inception"

    def __init__(self, batch_size: int = 64):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
            raise ImportError("Inception FID needs torchmetrics, torch-fidelity and a torchvision that imports "
                              f"with this torch (pip install 'torchmetrics[image]'): {exc}") from None
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()
        self.batch_size = batch_size
        self.version = "inception-v3-compat"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for b in _batches(images, self.batch_size):
            pixels = torch.from_numpy(to_pixels(b)).permute(0, 3, 1, 2).to(b.device)  # uint8 [B, 3, H, W]
            out.append(self.net(pixels).reshape(len(b), -1))
        return torch.cat(out).numpy()
