"""Plain diffusion training of a UNet on latents (the teacher build's UNet stage, and fine-tuning a teacher
on a user's images): the noise-prediction objective of the teacher's own parameterization, min-SNR-gamma
weighting (Hang et al. 2023), caption dropout for classifier-free guidance, EMA weights for sampling.

The betas and the prediction type (epsilon, v_prediction or sample) come from the model's scheduler
config, so a v-prediction SD 2.x teacher is fine-tuned with a v loss on its own schedule.
"""
from __future__ import annotations

import torch

from .. import parameterization as P
from .. import schedules, world
from .data.shapes import sample_captions
from ..models.components import encode_text
from .loop import ema_update, step_generator


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weight of the MSE in the network's own output space (Hang et al. 2023, Eq. 10):
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class UNetTask:
    """Diffusion training of ``unet`` on cached latents, with the teacher's schedule and prediction type.

    Args:
        unet, ema: the trained UNet and its EMA copy.
        text_encoder, tokenizer: the frozen prompt encoder.
        latents: [N, C, h, w] (VAE mode x scaling_factor).
        scenes / captions: world scenes, captioned afresh each step; or one fixed caption per latent.
        seed, batch_size: the batch stream (a pure function of (seed, step)).
        scheduler_config: the model's scheduler config (betas, prediction_type).
    """

    def __init__(self, unet, ema, text_encoder, tokenizer, latents: torch.Tensor, scenes: list[world.Scene] | None,
                 seed: int, batch_size: int, *, scheduler_config: dict, caption_dropout: float = 0.1,
                 snr_gamma: float = 5.0, ema_decay: float = 0.999, preview_fn=None,
                 captions: list[str] | None = None):
        if (scenes is None) == (captions is None):
            raise ValueError("give either scenes (world data) or captions (fixed), not both")
        schedules.check_schedule(scheduler_config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in P.PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {P.PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.unet, self.ema, self.text_encoder, self.tok = unet, ema, text_encoder, tokenizer
        self.latents, self.scenes, self.seed, self.bs = latents, scenes, seed, batch_size
        self.captions = captions
        self.caption_dropout, self.snr_gamma, self.ema_decay = caption_dropout, snr_gamma, ema_decay
        self.alpha_bar = schedules.alphas_cumprod_from_config(scheduler_config).float()
        self.preview_fn = preview_fn

    def modules(self):
        return {"unet": self.unet, "ema": self.ema}

    def parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]  # all, or a LoRA adapter's only

    def batch(self, step):
        g = step_generator(self.seed, step)
        idx = torch.randint(len(self.latents), (self.bs,), generator=g)
        captions = (sample_captions([self.scenes[i] for i in idx.tolist()], self.seed, step) if self.captions is None
                    else [self.captions[i] for i in idx.tolist()])
        drop = (torch.rand(self.bs, generator=g) < self.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        return {"z0": self.latents[idx], "text": encode_text(self.text_encoder, self.tok, captions),
                "noise": torch.randn(self.latents[idx].shape, generator=g),
                "t": torch.randint(0, len(self.alpha_bar), (self.bs,), generator=g)}

    def loss(self, batch, step):
        a = self.alpha_bar[batch["t"]]
        z_t = schedules.add_noise(batch["z0"], batch["noise"], a)
        out = self.unet(z_t, batch["t"], batch["text"]).sample
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        target = P.output_from_x0_eps(batch["z0"], batch["noise"], alpha, sigma, self.prediction_type)
        per_sample = (out - target).pow(2).mean(dim=(1, 2, 3))
        weight = min_snr_weight(schedules.snr(a), self.snr_gamma, self.prediction_type)
        return (weight * per_sample).mean(), {"mse": float(per_sample.detach().mean())}

    def after_update(self, step):
        ema_update(self.ema, self.unet, min(self.ema_decay, (1 + step) / (10 + step)))

    def preview(self, step, out_dir):
        if self.preview_fn is not None:
            self.preview_fn(self.ema, step, out_dir)
