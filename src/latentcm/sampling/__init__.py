"""Every sampler: ``lcm`` (multistep consistency sampling, pure), ``teacher`` (CFG with diffusers' schedulers),
``student`` (LCM text-to-image and img2img latents) and ``latents.sample_latents``, the one entry."""
