"""TCD sampling (gamma): Zheng et al. 2024's strategic stochastic sampling, against diffusers' TCDScheduler on the
shipped (exported) LCM; gamma None keeps the LCM sampler; what gamma = 1 is and is not."""
import pytest
import torch

from latentcm import registry
from latentcm.bundle import Bundle, ModelError
from latentcm.cli import main
from latentcm.models.denoiser import ConsistencyModel, Denoiser
from latentcm.guidance import guidance_scale_embedding
from latentcm.sampling.lcm import per_image_noise, sample_lcm, tcd_s, tcd_step
from latentcm.schedules import alphas_cumprod_from_config, lcm_timesteps, refine_timesteps

PROMPTS, SEEDS = ["a large red circle on a blue background", "a small green star on a white background"], [7, 8]


@pytest.fixture(scope="module")
def lcm():
    return Bundle.load(registry.resolve("lcm"))


@pytest.fixture(scope="module")
def pipe():
    """diffusers' own pipeline on the shipped (exported) LCM folder, with a TCDScheduler."""
    from diffusers import LatentConsistencyModelPipeline, TCDScheduler

    pipe = LatentConsistencyModelPipeline.from_pretrained(registry.resolve("lcm"), local_files_only=True)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    return pipe


@torch.no_grad()
def tcd_reference(pipe, steps: int, gamma: float, guidance: float = 8.5, seeds=SEEDS) -> torch.Tensor:
    """TCDScheduler's loop driven by hand (the LCM pipeline passes eta=None, which TCDScheduler refuses): the
    pipeline's prompt encoding and w embedding, one generator per image (latents first, then step noises)."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    latents = torch.cat([torch.randn((1, c, h, h), generator=g) for g in gens])  # [B, C, h, w]
    cond = pipe.encode_prompt(PROMPTS[:len(seeds)], "cpu", 1, False)[0]
    w = torch.tensor(guidance - 1.0).repeat(len(seeds))
    w_emb = pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim)
    for t in sched.timesteps:
        out = pipe.unet(latents, t, timestep_cond=w_emb, encoder_hidden_states=cond).sample
        latents = sched.step(out, t, latents, eta=gamma, generator=gens).prev_sample
    return latents


@pytest.mark.shipped
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_gamma_equals_diffusers_tcd_scheduler_on_the_shipped_lcm(lcm, pipe, steps, gamma):
    ours = lcm.sample_latents(PROMPTS, SEEDS, "lcm", steps, 8.5, gamma=gamma, schedule="grid")  # diffusers picks
    ref = tcd_reference(pipe, steps, gamma)
    # measured max |diff| ~2e-6 (float64 vs float32 schedule tables, LCM's c_skip <= 1e-6 at t >= 139)
    torch.testing.assert_close(ours, ref, rtol=0, atol=5e-5)


def test_tcd_step_equals_tcd_scheduler_step():
    """One step from a raw output, every prediction type, mid-schedule and last step."""
    from diffusers import TCDScheduler

    torch.manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        sched = TCDScheduler(prediction_type=prediction_type)
        table = alphas_cumprod_from_config(dict(sched.config))
        for gamma in (0.0, 0.3, 0.7, 1.0):
            sched.set_timesteps(4)
            ts = [int(t) for t in sched.timesteps]
            for i, t in enumerate(ts):
                t_prev = ts[i + 1] if i + 1 < len(ts) else None
                gen = torch.Generator().manual_seed(0)
                ref = sched.step(out, t, x, eta=gamma, generator=gen).prev_sample
                z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                ours = tcd_step(out, t, x, t_prev, z, gamma, alpha_bar=table, prediction_type=prediction_type)
                torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)
    assert tcd_s(979, 0.3) == 685 and tcd_s(259, 1.0) == 0 and tcd_s(259, 0.0) == 259


def test_grids_and_img2img_timesteps_equal_tcd_schedulers():
    from diffusers import TCDScheduler

    shipped = Bundle.load(registry.resolve("lcm")).scheduler_config
    for original in sorted({shipped["original_inference_steps"], 10, 50}):  # the shipped grid and two others
        config = {**shipped, "original_inference_steps": original}
        sched = TCDScheduler.from_config(config)
        cases = [(1, 1.0), (4, 1.0), (8, 1.0), (2, 0.5), (4, 0.3), (2, 0.3)]
        for steps, strength in [(n, s) for n, s in cases if n <= int(original * s)]:  # diffusers' valid range
            sched.set_timesteps(steps, strength=strength)
            got = lcm_timesteps(steps, 1000, original, strength)
            assert got.tolist() == sched.timesteps.tolist(), (original, steps, strength)


@pytest.mark.shipped
def test_default_gamma_none_is_the_lcm_sampler_bit_for_bit(lcm):
    """gamma=None takes the LCM Algorithm 3 path unchanged; diffusers' LCM pipeline agrees with it, given the
    shipped LCM's own (refine) timesteps."""
    from diffusers import LatentConsistencyModelPipeline

    default = lcm.sample_latents(PROMPTS, SEEDS, "lcm", 4, 8.5)
    assert torch.equal(default, lcm.sample_latents(PROMPTS, SEEDS, "lcm", 4, 8.5, gamma=None))
    lcm_pipe = LatentConsistencyModelPipeline.from_pretrained(registry.resolve("lcm"), local_files_only=True)
    lcm_pipe.set_progress_bar_config(disable=True)
    timesteps = refine_timesteps(4, 1000, lcm.original_inference_steps).tolist()
    ref = lcm_pipe(PROMPTS, timesteps=timesteps, guidance_scale=8.5, output_type="latent",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    torch.testing.assert_close(default, ref, rtol=0, atol=1e-4)


@pytest.mark.shipped
def test_gamma_zero_is_deterministic_and_gamma_changes_the_images(lcm):
    a = lcm.generate(PROMPTS, SEEDS, "lcm", 4, 8.5, gamma=0.0)
    b = lcm.generate(PROMPTS, [100, 101], "lcm", 4, 8.5, gamma=0.0)
    # gamma 0: no noise after the first draw, the seed only sets the initial latents -- runs repeat exactly
    assert torch.equal(a, lcm.generate(PROMPTS, SEEDS, "lcm", 4, 8.5, gamma=0.0)) and not torch.equal(a, b)
    mid = lcm.generate(PROMPTS, SEEDS, "lcm", 4, 8.5, gamma=0.3)
    assert (mid - a).abs().max() > 1e-2
    # image b depends on its seed only, under TCD too. A batch of 1 and a batch of 2 run different conv kernels,
    # so they agree to float rounding (seen: 2e-5), not bit for bit; 1e-4 is 0.013 of an 8-bit level, and another
    # seed's noise would move the image by > 1e-2 (the gamma check above)
    single = lcm.generate(PROMPTS[1:], SEEDS[1:], "lcm", 4, 8.5, gamma=0.3)
    torch.testing.assert_close(mid[1:], single, rtol=0, atol=1e-4)


@pytest.mark.shipped
def test_gamma_one_is_lcm_only_where_alpha_bar_at_zero_is_one(lcm):
    """gamma = 1 puts s = 0: TCDScheduler's timestep 0 has alpha_bar[0] = 1 - beta_0 = 0.99915 < 1, so x_s keeps
    sqrt(1 - 0.99915) ~ 0.029 of the noise estimate and the last step returns that timestep-0 latent, not x0.
    On a table with alpha_bar[0] = 1 the two samplers are the same algorithm (equal up to float rounding)."""
    f = ConsistencyModel(Denoiser(lcm.unet, lcm.scheduler_config), timestep_scaling=10.0)
    cond = lcm.encode_prompts(PROMPTS)
    w_emb = guidance_scale_embedding(torch.full((2,), 7.5), lcm.unet.config.time_cond_proj_dim)
    ts = lcm_timesteps(4)

    def run(table, gamma):
        noise_fn = per_image_noise(SEEDS, (4, 16, 16))
        return sample_lcm(lambda x, t: f(x, t, cond, w_emb), noise_fn(-1), ts, noise_fn=noise_fn, alpha_bar=table,
                          gamma=gamma)

    table = f.denoiser.alpha_bar.clone()
    real = (run(table, 1.0) - run(table, None)).abs().max()
    assert 0.05 < real < 0.5  # measured 0.107 in latent units on the shipped LCM
    table[0] = 1.0
    torch.testing.assert_close(run(table, 1.0), run(table, None), rtol=0, atol=1e-5)


def test_cli_generate_gamma(tmp_path, capsys):
    out = tmp_path / "tcd.png"
    main(["generate", "a red circle", "--num-images", "1", "--steps", "2", "--gamma", "0.3", "--out", str(out)])
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    for args, needle in [(["--gamma", "1.5"], "not in the range"), (["--gamma", "nan"], "not a finite number"),
                         (["--model", "teacher", "--steps", "2", "--gamma", "0.2"], "needs an LCM")]:
        with pytest.raises(SystemExit) as exc:
            main(["generate", "a red circle", "--num-images", "1", "--out", str(out), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_teacher_refuses_gamma():
    with pytest.raises(ModelError, match="needs an LCM"):
        Bundle.load(registry.resolve("teacher")).generate(["a red circle"], [0], "ddim", 2, 7.5, gamma=0.3)
