"""Building the shipped offline teacher: ``stages`` (VAE, CLIP, judge, UNet; resumable), ``tasks`` (the
non-diffusion stage tasks) and ``card`` (its model card)."""
