"""Every sampler: ``lcm`` (multistep consistency sampling, pure), ``teacher`` (CFG with diffusers' schedulers),
``student`` (LCM text-to-image and img2img latents), ``options`` (``SamplingOptions``: the sampling options and
every rule about which go together) and ``latents.sample`` / ``sample_latents``, the one entry."""
