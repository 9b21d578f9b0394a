"""Style accuracy for the fine-tuning experiment: a tiny CNN that tells striped objects from plain ones.

Trained on real images (half base world, half the striped set, training parts) and, when a VAE is
given, on their VAE round trips too, with a fixed seed, in a few minutes on a CPU; cached by its
settings. Every generated image leaves through the VAE decoder, which softens the 12-pixel stripes:
the v1 judge, trained on real images only, called just 56% of VAE-reconstructed *real* striped
images striped, so it under-counted style in samples. Like the judge it never trains or conditions
a generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import styles, world
from ..files import atomic_path
from ..images import from_pixels, vae_round_trip

VERSION = "v2"  # v2: trained on real images and their VAE round trips


class StyleJudge(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        layers, cin = [], 3
        for cout, stride in ((w, 1), (2 * w, 2), (2 * w, 2), (4 * w, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU()]
            cin = cout
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> logit of "striped" [B]."""
        return self.net(images).squeeze(-1)

    @torch.no_grad()
    def is_striped(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        return torch.cat([self(images[i:i + batch_size].float()) > 0
                          for i in range(0, len(images), batch_size)]).numpy()


def labelled_images(count: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` plain and ``count`` striped images of ``split`` (train | heldout), and 0/1 labels."""
    plain_split = "train" if split == "train" else "heldout"
    plain = [world.make_sample(seed, i, plain_split).image for i in range(count)]
    striped = [styles.make_styled_sample(seed, i, split).image for i in range(count)]
    x = np.stack([np.asarray(im) for im in plain + striped])
    images = from_pixels(x)  # [2 count, 3, H, W] in [-1, 1]
    return images, torch.cat([torch.zeros(count), torch.ones(count)])


def train_style_judge(steps: int = 400, batch_size: int = 64, count: int = 2000, seed: int = 0,
                      vae=None) -> StyleJudge:
    """A StyleJudge fit to real labelled images, plus their VAE round trips when ``vae`` is given."""
    torch.manual_seed(seed)
    images, labels = labelled_images(count, seed + 1, "train")
    if vae is not None:
        images, labels = torch.cat([images, vae_round_trip(vae, images)]), torch.cat([labels, labels])
    judge = StyleJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(judge(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return judge.eval().requires_grad_(False)


def load_or_train(cache_dir: Path, steps: int = 400, seed: int = 0, vae=None, vae_tag: str = "none",
                  count: int = 2000) -> tuple[StyleJudge, str]:
    """The style judge cached in ``cache_dir`` (trained on first use); returns it and its version tag.
    ``vae_tag`` names ``vae`` in the cache key (e.g. a hash of its weights)."""
    size = "" if count == 2000 else f"-c{count}"
    tag = f"style-judge-{VERSION}-s{seed}-n{steps}{size}-vae-{vae_tag if vae is not None else 'none'}"
    path = Path(cache_dir) / f"{tag}.safetensors"
    judge = StyleJudge()
    if path.is_file():
        judge.load_state_dict(load_file(str(path)))
        return judge.eval().requires_grad_(False), tag
    judge = train_style_judge(steps, count=count, seed=seed, vae=vae)
    with atomic_path(path) as tmp:
        save_file(judge.state_dict(), str(tmp))
    return judge, tag


def load_or_train_for(model_dir: str | Path, cache_dir: Path, steps: int = 800) -> tuple[StyleJudge, str, object]:
    """The style judge for images decoded by ``model_dir``'s VAE (trained on first use, cached under the
    VAE's content hash): (judge, version tag, that VAE)."""
    from diffusers import AutoencoderKL

    from .extractors import file_version

    vae_dir = Path(model_dir) / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    judge, tag = load_or_train(cache_dir, steps=steps, vae=vae,
                               vae_tag=file_version(vae_dir / "diffusion_pytorch_model.safetensors"))
    return judge, tag, vae


def heldout_accuracy(judge: StyleJudge, count: int = 500, seed: int = 99, vae=None) -> dict[str, float]:
    """The style judge on held-out images: accuracy on real ones and, with ``vae``, on their round
    trips, plus the striped recall of each (the ceiling a generator's style accuracy is read against)."""
    images, labels = labelled_images(count, seed, "heldout")
    truth = labels.numpy().astype(bool)
    sets = {"real": images, **({"vae_round_trip": vae_round_trip(vae, images)} if vae is not None else {})}
    out = {}
    for name, x in sets.items():
        pred = judge.is_striped(x)
        out[f"{name}_accuracy"] = round(float((pred == truth).mean()), 4)
        out[f"{name}_striped_recall"] = round(float(pred[truth].mean()), 4)
    return out
