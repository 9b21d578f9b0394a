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

from ..sampling.lcm import keep_channel_means


class KeepMeansLCMScheduler(LCMScheduler):
    """``LCMScheduler`` with keep-means re-noising (LCM Algorithm 3's fresh noise, its channel means kept)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        out = super().step(model_output, timestep, sample, generator=generator, return_dict=True)
        if self.step_index == self.num_inference_steps:  # the last step: LCMScheduler adds no noise
            return out if return_dict else (out.prev_sample, out.denoised)
        a_t, a_next = self.alphas_cumprod[timestep], self.alphas_cumprod[self.timesteps[self.step_index]]
        denoised = out.denoised
        noise = (out.prev_sample - a_next.sqrt() * denoised) / (1 - a_next).sqrt()  # the draw LCMScheduler made
        estimate = (sample - a_t.sqrt() * denoised) / (1 - a_t).sqrt()
        prev = a_next.sqrt() * denoised + (1 - a_next).sqrt() * keep_channel_means(noise, estimate)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev, denoised)
