"""latentcm: Latent Consistency Models (Luo et al., 2023) on any Stable-Diffusion-family model."""
from . import offline  # noqa: F401

__version__ = "0.1.0"
