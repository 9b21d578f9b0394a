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
    """Every teacher sampler: per-image seeds (other seed -> other image, same seed -> same image at any
    batch size), diffusers' StableDiffusionPipeline with that scheduler as the reference, and the three
    samplers giving three different images (3 steps: DPM-Solver's second-order step is taken)."""
    import itertools

    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    b = Bundle.load(micro_teacher)
    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.scheduler.config
    schedulers = {  # built here from diffusers' documented options, not through sampling.teacher.make_scheduler
        "ddim": DDIMScheduler.from_config(cfg),
        "dpm-solver": DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver", solver_order=2,
                                                              final_sigmas_type="sigma_min"),
        "dpm-solver++": DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                                final_sigmas_type="zero"),
    }
    prompts, seeds, images = ["a ring"] * 2, [0, 1], {}
    for sampler, scheduler in schedulers.items():
        pair = b.generate(prompts, seeds, sampler, 3, 3.0)
        assert pair.shape == (2, 3, 64, 64) and torch.isfinite(pair).all()
        assert (pair[0] - pair[1]).abs().max() > 0.1, sampler  # same prompt, other seed
        torch.testing.assert_close(b.generate(prompts[:1], seeds[1:], sampler, 3, 3.0)[0], pair[1],
                                   rtol=0, atol=1e-5)  # same seed alone in a batch of one
        pipe.scheduler = scheduler
        ref = pipe(prompts, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                   latents=initial_latents(seeds, b.latent_shape(64, 64))).images  # [B, 3, H, W] in [0, 1]
        torch.testing.assert_close(pair, ref * 2 - 1, rtol=0, atol=1e-4, msg=lambda m, s=sampler: f"{s}: {m}")
        images[sampler] = pair
    for a, c in itertools.combinations(images, 2):
        assert (images[a] - images[c]).abs().max() > 1e-3, (a, c)


def test_trailing_samplers_start_from_pure_noise_and_match_diffusers(micro_teacher):
    """``<solver>-trailing``: the same solver on diffusers' trailing grid (first step t = 999, as the LCM's),
    against the config's leading grid (DDIM's first step of 4 is t = 751 with SD's steps_offset 1)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from latentcm.defaults import TEACHER_SOLVERS, TRAILING
    from latentcm.sampling.teacher import make_scheduler

    b = Bundle.load(micro_teacher)
    cfg = {**b.scheduler_config, "timestep_spacing": "leading", "steps_offset": 1}
    for solver in TEACHER_SOLVERS:
        trailing, leading = make_scheduler(solver + TRAILING, cfg), make_scheduler(solver, cfg)
        trailing.set_timesteps(4), leading.set_timesteps(4)
        assert type(trailing) is type(leading)
        assert trailing.timesteps.tolist() == [999, 749, 499, 249], solver
        assert leading.timesteps.tolist()[0] == (751 if solver == "ddim" else 801), solver  # DPM: T // (n + 1) grid
    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    seeds = [0, 1]
    ours = b.generate(["a ring"] * 2, seeds, "ddim" + TRAILING, 3, 3.0)
    ref = pipe(["a ring"] * 2, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
               latents=initial_latents(seeds, b.latent_shape(64, 64))).images
    torch.testing.assert_close(ours, ref * 2 - 1, rtol=0, atol=1e-4)
    if b.scheduler_config.get("timestep_spacing", "leading") != "trailing":
        assert (ours - b.generate(["a ring"] * 2, seeds, "ddim", 3, 3.0)).abs().max() > 1e-3
