import torch

from latentcm.bundle import Bundle
from latentcm.sampling.teacher import cfg_combine, initial_latents


def test_initial_latents_do_not_depend_on_batch_size():
    a = initial_latents([5, 6, 7], (4, 8, 8))
    b = initial_latents([6], (4, 8, 8))
    assert torch.equal(a[1], b[0])


def test_cfg_combine_convention():
    u, c = torch.zeros(2), torch.ones(2)
    assert torch.equal(cfg_combine(u, c, 1.0), c)  # g = 1: plain conditional
    assert torch.equal(cfg_combine(u, c, 7.5), torch.full((2,), 7.5))


def test_images_do_not_depend_on_batch_composition(micro_teacher):
    b = Bundle.load(micro_teacher)
    pair = b.generate(["a red circle", "a blue square"], [3, 4], "dpm-solver++", 3, 5.0)
    single = b.generate(["a blue square"], [4], "dpm-solver++", 3, 5.0)
    assert torch.allclose(pair[1], single[0], atol=1e-5)


def test_every_sampler_runs(micro_teacher):
    b = Bundle.load(micro_teacher)
    for sampler in ("ddim", "dpm-solver", "dpm-solver++"):
        img = b.generate(["a ring"], [0], sampler, 2, 3.0)
        assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
