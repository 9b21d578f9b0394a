"""The independent judge: a small CNN that reads a 64x64 image's attributes.

It is trained on real world images only and never trains or conditions a generator;
evaluation (accuracy, FID features) builds on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import world

FEATURE_DIM = 256


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class Judge(nn.Module):
    """Attribute classifier; ``features`` gives the penultimate layer (for FID)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        w = width
        self.trunk = nn.Sequential(_block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2),
                                   _block(4 * w, 4 * w, 2), _block(4 * w, 4 * w, 2), nn.Flatten(),
                                   nn.Linear(4 * w * 16, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in world.ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, 64, 64] in [-1, 1] -> [B, FEATURE_DIM]."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        logits = self(images)
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: world.ATTRIBUTES[k][idx[k][i]] for k in idx} for i in range(images.shape[0])]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "judge.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"width": self.width, "attributes": {k: list(v) for k, v in world.ATTRIBUTES.items()}}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "Judge":
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg["attributes"] != {k: list(v) for k, v in world.ATTRIBUTES.items()}:
            raise ValueError(f"judge in {folder} was trained on a different attribute set")
        judge = cls(cfg["width"])
        judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
        return judge.eval().requires_grad_(False)


def attribute_targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Class indices per attribute for a list of scenes."""
    return {k: torch.tensor([v.index(getattr(s, k)) for s in scenes]) for k, v in world.ATTRIBUTES.items()}
