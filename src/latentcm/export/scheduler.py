"""A diffusers scheduler for latentcm's keep-means re-noising, so diffusers' own LCM pipelines can sample an
LCM as ``lcm generate --renoise keep-means`` does (``sampling.lcm``):

    from latentcm.export.scheduler import KeepMeansLCMScheduler
    pipe.scheduler = KeepMeansLCMScheduler.from_config(pipe.scheduler.config)

It is diffusers' ``LCMScheduler`` whose re-noising noise (drawn as there, from the same generators) has each
channel's spatial mean replaced by that of the step's noise estimate (x_t - alpha_t x0) / sigma_t.
"""
from __future__ import annotations

from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ..sampling.lcm import keep_channel_means, noise_estimate, renoise


class KeepMeansLCMScheduler(LCMScheduler):
    """``LCMScheduler`` with keep-means re-noising (LCM Algorithm 3's fresh noise, its channel means kept)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        out = super().step(model_output, timestep, sample, generator=generator, return_dict=True)
        if self.step_index == self.num_inference_steps:  # the last step: LCMScheduler adds no noise
            return out if return_dict else (out.prev_sample, out.denoised)
        table, t_next, denoised = self.alphas_cumprod, int(self.timesteps[self.step_index]), out.denoised
        drawn = noise_estimate(out.prev_sample, denoised, t_next, table)  # the noise LCMScheduler added
        kept = keep_channel_means(drawn, noise_estimate(sample, denoised, int(timestep), table))
        prev = renoise(denoised, t_next, kept, table)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev, denoised)
