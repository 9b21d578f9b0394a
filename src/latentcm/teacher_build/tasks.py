"""Tasks of the teacher build that are not diffusion: the VAE, the tiny CLIP and the judge (the UNet stage
is ``training.diffusion.UNetTask``). Each is a ``training.loop.Task``; batches come from a generator seeded
by ``(seed, step)``."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import world
from ..images import save_grid
from ..models.judge import Judge, attribute_targets
from ..training.data.shapes import WorldData, sample_captions
from ..training.loop import step_generator


# --- VAE -------------------------------------------------------------------------

class VAETask:
    """AutoencoderKL on world images: MSE + L1 reconstruction, tiny KL (as in SD's VAE).

    Trains on 32x32 crops (the VAE is fully convolutional, no attention) for speed and on
    whole 64x64 images for the final ``full_fraction`` of the steps."""

    def __init__(self, vae, data: WorldData, seed: int, batch_size: int, max_steps: int,
                 kl_weight: float = 1e-6, crop: int = 32, full_fraction: float = 0.25):
        self.vae, self.data, self.seed, self.bs = vae, data, seed, batch_size
        self.kl_weight, self.crop = kl_weight, crop
        self.full_from = int(max_steps * (1 - full_fraction))

    def modules(self):
        return {"vae": self.vae}

    def parameters(self):
        return list(self.vae.parameters())

    def batch(self, step):
        g = step_generator(self.seed, step)
        x = self.data.pixels(torch.randint(len(self.data.images), (self.bs,), generator=g))
        if step < self.full_from:
            i, j = torch.randint(0, x.shape[-1] - self.crop + 1, (2,), generator=g).tolist()
            x = x[..., i:i + self.crop, j:j + self.crop]
        return {"x": x}

    def loss(self, batch, step):
        post = self.vae.encode(batch["x"]).latent_dist
        rec = self.vae.decode(post.mode()).sample
        mse, l1 = F.mse_loss(rec, batch["x"]), F.l1_loss(rec, batch["x"])
        kl = post.kl().mean()
        psnr = 10 * torch.log10(4.0 / mse.detach())  # peak-to-peak range 2 in [-1, 1]
        return mse + 0.5 * l1 + self.kl_weight * kl, {"mse": float(mse.detach()), "psnr": float(psnr)}

    def after_update(self, step):
        pass

    @torch.no_grad()
    def preview(self, step, out_dir):
        x = self.data.pixels(torch.arange(16))
        rec = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        save_grid(torch.cat([x, rec]), out_dir / f"vae-{step:07d}.png")


@torch.no_grad()
def encode_mode(vae, data: WorldData, count: int | None = None, batch_size: int = 128) -> torch.Tensor:
    """Posterior-mode latents of the first ``count`` images, unscaled, [N, 4, h, w]."""
    n = len(data.images) if count is None else min(count, len(data.images))
    return torch.cat([vae.encode(data.pixels(torch.arange(i, min(i + batch_size, n)))).latent_dist.mode()
                      for i in range(0, n, batch_size)])


def measure_scaling_factor(vae, data: WorldData, count: int = 2048) -> float:
    """1 / std of the latents (posterior mode), so scaled latents have unit variance."""
    return float(1.0 / encode_mode(vae, data, count).std())


# --- tiny CLIP -------------------------------------------------------------------

def compatibility(scenes: list[world.Scene], captions: list[str]) -> torch.Tensor:
    """[images, captions] 1 where every attribute the caption mentions matches the image."""
    parsed = [world.parse_caption(c) for c in captions]
    return torch.tensor([[float(all(getattr(s, k) == v for k, v in p.items())) for p in parsed]
                         for s in scenes])


class CLIPTask:
    """Contrastive pre-training of the tiny CLIP with multi-positive targets: a caption
    is a positive for every image in the batch it truly describes."""

    def __init__(self, clip, tokenizer, data: WorldData, seed: int, batch_size: int):
        self.clip, self.tok, self.data, self.seed, self.bs = clip, tokenizer, data, seed, batch_size

    def modules(self):
        return {"clip": self.clip}

    def parameters(self):
        return list(self.clip.parameters())

    def batch(self, step):
        g = step_generator(self.seed, step)
        idx = torch.randint(len(self.data.images), (self.bs,), generator=g)
        scenes = [self.data.scenes[i] for i in idx.tolist()]
        captions = sample_captions(scenes, self.seed, step)
        ids = self.tok(captions, padding="max_length", max_length=self.tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": self.data.pixels(idx), "input_ids": ids,
                "positive": compatibility(scenes, captions)}

    def loss(self, batch, step):
        out = self.clip(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        logits = out.logits_per_image  # [B_img, B_txt]
        pos = batch["positive"]
        loss_i = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss_t = -(F.log_softmax(logits.T, 1) * pos.T / pos.T.sum(1, keepdim=True)).sum(1).mean()
        top1 = pos.gather(1, logits.argmax(1, keepdim=True)).mean()
        return (loss_i + loss_t) / 2, {"img2txt_top1": float(top1)}

    def after_update(self, step):
        pass

    def preview(self, step, out_dir):
        pass


# --- judge -----------------------------------------------------------------------

def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild noise, blur and colour jitter, so the judge reads generated images too."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=g) * 0.8
    x = (1 - mix) * x + mix * blur
    x = x + 0.06 * (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1)
    x = x + torch.rand(b, 1, 1, 1, generator=g) * 0.12 * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


class JudgeTask:
    def __init__(self, judge: Judge, data: WorldData, seed: int, batch_size: int):
        self.judge, self.data, self.seed, self.bs = judge, data, seed, batch_size

    def modules(self):
        return {"judge": self.judge}

    def parameters(self):
        return list(self.judge.parameters())

    def batch(self, step):
        g = step_generator(self.seed, step)
        idx = torch.randint(len(self.data.images), (self.bs,), generator=g)
        targets = attribute_targets([self.data.scenes[i] for i in idx.tolist()])
        return {"x": augment(self.data.pixels(idx), g), **{f"y_{k}": v for k, v in targets.items()}}

    def loss(self, batch, step):
        logits = self.judge(batch["x"])
        losses = {k: F.cross_entropy(v, batch[f"y_{k}"]) for k, v in logits.items()}
        acc = {f"acc_{k}": float((v.argmax(1) == batch[f"y_{k}"]).float().mean()) for k, v in logits.items()}
        return sum(losses.values()), acc

    def after_update(self, step):
        pass

    def preview(self, step, out_dir):
        pass
