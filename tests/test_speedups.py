"""The opt-in sampling speed-ups of ``Bundle.optimize`` keep the fp32 output (they exist to sample faster than
diffusers). Their speed is a benchmark (``benchmarks/bench_sampling.py``), not a test."""
import torch

from latentcm.bundle import Bundle

PROMPTS = ["a small red circle on a blue background", "a large green square on a white background"]


def _images(bundle: Bundle, steps: int = 2) -> torch.Tensor:
    return bundle.generate(PROMPTS, [3, 4], "lcm", steps, 8.5)


def test_prompt_cache_gives_the_same_images_and_counts_hits(micro_lcm):
    plain = _images(Bundle.load(micro_lcm))
    cached = Bundle.load(micro_lcm).optimize(prompt_cache=8)
    first, second = _images(cached), _images(cached)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert cached.prompt_cache_stats["hits"] >= len(PROMPTS)


def test_channels_last_vae_matches_the_contiguous_decoder(micro_lcm):
    plain = _images(Bundle.load(micro_lcm))
    fast = _images(Bundle.load(micro_lcm).optimize(channels_last_vae=True))
    assert (fast - plain).abs().max() < 1e-5


def test_compiled_channels_last_unet_matches_eager_fp32(micro_lcm):
    plain = _images(Bundle.load(micro_lcm))
    bundle = Bundle.load(micro_lcm).optimize(compile_unet=True, channels_last_vae=True)
    assert bundle.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = _images(bundle)
    assert out.shape == plain.shape
    assert (out - plain).abs().max() < 1e-4  # inductor reorders float sums; far below one 8-bit level (7.8e-3)
