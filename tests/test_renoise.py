"""The LCM sampler's keep-means re-noising: the fresh noise's channel means replaced by the step's own noise
estimate's (``sampling.lcm.keep_channel_means``), chosen per call or by a model folder's sampling.json."""
import json

import pytest
import torch

from latentcm.bundle import Bundle
from latentcm.errors import ModelError
from latentcm.evaluation.pipeline import Row
from latentcm.export.pipeline import write_sampling
from latentcm.sampling.lcm import keep_channel_means, per_image_noise, sample_lcm
from latentcm.sampling.options import ModelTraits, SamplingOptions
from latentcm.schedules import alpha_sigma_at, alphas_cumprod_from_config

PROMPT = "a red circle on a blue background"


def test_keep_channel_means_swaps_the_means_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    noise, estimate = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) + 2.0
    out = keep_channel_means(noise, estimate)
    torch.testing.assert_close(out.mean((2, 3)), estimate.mean((2, 3)))
    torch.testing.assert_close(out - out.mean((2, 3), keepdim=True), noise - noise.mean((2, 3), keepdim=True))


def test_keep_means_re_noises_with_the_noise_estimates_means_by_hand():
    """A consistency function that always answers x0 = 0 makes the noise estimate x_t / sigma_t, so after step 1
    the state's channel means are sigma_next * mean(x_T) / sigma_T and its zero-mean part the fresh draw's."""
    table = alphas_cumprod_from_config({})
    noise_fn = per_image_noise([1, 2], (4, 8, 8))
    states = []
    sample_lcm(lambda x, t: torch.zeros_like(x), noise_fn(-1), [999, 499], noise_fn=noise_fn, alpha_bar=table,
               callback=states.append, keep_means=True)
    (_, sigma_T), (_, sigma_n) = alpha_sigma_at(table, 999), alpha_sigma_at(table, 499)
    x1, x_T, z = states[0]["x"], noise_fn(-1), noise_fn(0)
    torch.testing.assert_close(x1.mean((2, 3)), (sigma_n / sigma_T).float() * x_T.mean((2, 3)))
    torch.testing.assert_close(x1 - x1.mean((2, 3), keepdim=True),
                               sigma_n.float() * (z - z.mean((2, 3), keepdim=True)))


def test_keep_means_with_gamma_is_refused():
    noise_fn = per_image_noise([1], (4, 8, 8))
    with pytest.raises(ValueError, match="keep_means"):
        sample_lcm(lambda x, t: x, noise_fn(-1), [999, 499], noise_fn=noise_fn, gamma=0.2, keep_means=True)


def test_options_take_the_models_mode_unless_given_and_fresh_under_gamma():
    model = ModelTraits(is_lcm=True, original_inference_steps=20, renoise="keep-means")
    assert SamplingOptions().resolve(model).renoise == "keep-means"
    assert SamplingOptions(renoise="fresh").resolve(model).renoise == "fresh"
    assert SamplingOptions(gamma=0.3).resolve(model).renoise == "fresh"
    assert SamplingOptions().resolve(ModelTraits(is_lcm=True, original_inference_steps=20)).renoise == "fresh"
    assert SamplingOptions().resolve(ModelTraits(is_lcm=False)).renoise is None


def test_one_step_is_unchanged_and_later_steps_change(micro_lcm):
    lcm = Bundle.load(micro_lcm)
    one = [lcm.sample_latents([PROMPT], [3], steps=1, renoise=r) for r in ("fresh", "keep-means")]
    torch.testing.assert_close(one[0], one[1], rtol=0, atol=0)
    four = [lcm.sample_latents([PROMPT], [3], steps=4, renoise=r) for r in ("fresh", "keep-means")]
    assert (four[0] - four[1]).abs().max() > 1e-4


def test_sampling_file_carries_the_mode_and_refuses_an_unknown_one(micro_lcm, tmp_path):
    folder = tmp_path / "lcm"
    folder.mkdir()
    written = json.loads(write_sampling(folder, "refine", renoise="keep-means").read_text())
    assert written == {"timestep_schedule": "refine", "renoise": "keep-means"}
    assert "renoise" not in json.loads(write_sampling(folder, "refine").read_text())  # fresh: nothing written
    with pytest.raises(ModelError, match="unknown renoise"):
        write_sampling(folder, "refine", renoise="ddpm")
    lcm = Bundle.load(micro_lcm)
    before = lcm.sample_latents([PROMPT], [3], steps=4, renoise="keep-means")
    lcm.use_sampling({**lcm.sampling_file(), "renoise": "keep-means"})
    assert lcm.traits.renoise == "keep-means" and lcm.sampling_file()["renoise"] == "keep-means"
    torch.testing.assert_close(lcm.sample_latents([PROMPT], [3], steps=4), before, rtol=0, atol=0)


def test_an_unknown_mode_in_sampling_json_is_one_line(micro_lcm, tmp_path):
    import shutil
    folder = tmp_path / "lcm"
    shutil.copytree(micro_lcm, folder)
    (folder / "sampling.json").write_text(json.dumps({"timestep_schedule": "grid", "renoise": "ddpm"}))
    with pytest.raises(ModelError, match="renoise must be one of fresh, keep-means"):
        Bundle.load(folder)


def test_a_rows_mode_is_in_its_cache_key():
    assert Row("lcm", "lcm", 4, 2.0).key != Row("lcm", "lcm", 4, 2.0, renoise="keep-means").key
    assert Row("lcm", "lcm", 4, 2.0, renoise="keep-means").options.renoise == "keep-means"


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_diffusers_pipeline_with_the_keep_means_scheduler_equals_ours(micro_lcm, steps):
    from diffusers import LatentConsistencyModelPipeline

    from latentcm.export.scheduler import KeepMeansLCMScheduler

    pipe = LatentConsistencyModelPipeline.from_pretrained(micro_lcm, local_files_only=True)
    pipe.scheduler = KeepMeansLCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [PROMPT, "a small green star"], [7, 8]
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = Bundle.load(micro_lcm).sample_latents(prompts, seeds, "lcm", steps, 3.0, schedule="grid",
                                                 renoise="keep-means")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    fresh = Bundle.load(micro_lcm).sample_latents(prompts, seeds, "lcm", steps, 3.0, schedule="grid")
    assert steps == 1 or (fresh - ours).abs().max() > 1e-4


def test_the_http_api_takes_the_mode_and_refuses_a_non_string():
    from latentcm.serve.validate import BadRequest, Limits, parse_request

    request = parse_request({"prompt": PROMPT, "renoise": "keep-means"}, Limits(), ())
    assert request.options.renoise == "keep-means" and parse_request({"prompt": PROMPT}, Limits(), ()).renoise is None
    with pytest.raises(BadRequest, match="renoise must be a string, got int"):
        parse_request({"prompt": PROMPT, "renoise": 1}, Limits(), ())


def test_an_export_carries_the_mode_and_its_card_says_how_diffusers_samples_it(micro_lcm, micro_teacher, tmp_path):
    """export_lcm(renoise="keep-means"): sampling.json names it, latentcm samples the folder with it by default,
    and the card's scheduler swap makes diffusers' pipeline give the same latents."""
    from diffusers import LatentConsistencyModelPipeline

    from latentcm.export.pipeline import export_lcm
    from latentcm.export.scheduler import KeepMeansLCMScheduler

    source = Bundle.load(micro_lcm)
    out = export_lcm(source.unet, micro_teacher, tmp_path / "km", {"lcd": {"omega_min": 1}}, schedule="grid",
                     renoise="keep-means")
    assert json.loads((out / "sampling.json").read_text())["renoise"] == "keep-means"
    card = (out / "README.md").read_text()
    assert "KeepMeansLCMScheduler.from_config(pipe.scheduler.config)" in card
    assert "KeepMeansLCMScheduler" not in (export_lcm(source.unet, micro_teacher, tmp_path / "fresh",
                                                      {"lcd": {"omega_min": 1}}) / "README.md").read_text()
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)
    pipe.scheduler = KeepMeansLCMScheduler.from_config(pipe.scheduler.config)  # as the card says
    pipe.set_progress_bar_config(disable=True)
    ref = pipe([PROMPT], num_inference_steps=4, guidance_scale=3.0, output_type="latent",
               generator=[torch.Generator().manual_seed(5)]).images
    ours = Bundle.load(out).sample_latents([PROMPT], [5], "lcm", 4, 3.0)  # the folder's own default re-noising
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_distill_renoise_writes_the_mode_into_the_exported_lcm(micro_teacher, tmp_path):
    from latentcm.cli import main

    out = tmp_path / "lcm"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
          "--num-data", "4", "--validate-every", "0", "--renoise", "keep-means"])
    assert json.loads((out / "sampling.json").read_text())["renoise"] == "keep-means"
    assert Bundle.load(out).traits.renoise == "keep-means" and "KeepMeansLCMScheduler" in (out / "README.md").read_text()
