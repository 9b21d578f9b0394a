"""The shipped offline default: diffusers loads it with no code of ours, and it draws."""
from pathlib import Path

import numpy as np
from PIL import Image

from latentcm import registry
from latentcm.bundle import Bundle, sampling_schedule
from latentcm.cli import main
from latentcm.evaluation.results import read_results
from latentcm.models.judge import Judge


def test_shipped_models_are_listed():
    found = registry.shipped_models()
    assert {"teacher", "judge", "lcm"} <= found.keys()


def test_diffusers_pipeline_matches_lcm_generate_ddim(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from latentcm.sampling.teacher import initial_latents

    prompt, seed = "a large yellow star on a blue background", 5
    out = tmp_path / "ours.png"
    main(["generate", prompt, "--model", "teacher", "--sampler", "ddim", "--steps", "10", "--guidance", "7.5",
          "--seed", str(seed), "--num-images", "1", "--out", str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(registry.shipped_models()["teacher"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents([seed], (4, 16, 16))
    ref = pipe(prompt, num_inference_steps=10, guidance_scale=7.5, latents=latents, output_type="np").images[0]
    ours = np.asarray(Image.open(out)).astype(np.float32) / 255
    assert np.abs(ours - ref).max() <= 1.5 / 255


def test_shipped_teacher_follows_a_prompt():
    """A cheap end-to-end check with the judge (the full evaluation is in the model card)."""
    from latentcm.bundle import Bundle

    bundle = Bundle.load(registry.shipped_models()["teacher"])
    judge = Judge.load(registry.shipped_models()["judge"])
    prompts = ["a red circle on a white background", "a blue square on a yellow background",
               "a green triangle on a black background", "a white ring on a purple background"]
    images = bundle.generate(prompts, [0, 1, 2, 3], "dpm-solver++", 20, 7.5)
    got = judge.predict(images)
    hits = sum(g["colour"] == w.split()[1] and g["background"] == w.split()[-2] for g, w in zip(got, prompts))
    assert hits >= 3, got


def test_teacher_card_numbers_come_from_the_committed_results():
    root = Path(__file__).resolve().parents[1]
    results = read_results(root / "reports" / "teacher" / "results.json")
    card = (registry.WEIGHTS / "teacher" / "README.md").read_text()
    for key in ("colour", "background", "shape"):
        assert f"{100 * results['attribute_accuracy'][key]:.1f}%" in card
    assert f"{results['vae_psnr_db']:.2f} dB" in card


def test_shipped_lcm_loads_in_diffusers_and_matches_our_sampler():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from latentcm.sampling.student import sample_student

    folder = registry.shipped_models()["lcm"]
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red star on a blue background"
    states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    g = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 16, 16), generator=g)
    ref = pipe(prompt, num_inference_steps=4, guidance_scale=8.5, latents=latents, generator=g,
               output_type="latent").images
    ours = sample_student(pipe.unet, dict(pipe.scheduler.config), states, [3], (4, 16, 16), steps=4, omega=7.5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_shipped_lcm_follows_a_prompt_in_four_steps():
    from latentcm.bundle import Bundle

    bundle = Bundle.load(registry.shipped_models()["lcm"])
    judge = Judge.load(registry.shipped_models()["judge"])
    prompts = ["a red circle on a white background", "a blue square on a yellow background",
               "a green triangle on a black background", "a white ring on a purple background"]
    got = judge.predict(bundle.generate(prompts, [0, 1, 2, 3]))  # defaults: lcm sampler, 4 steps, its own g
    hits = sum(g["colour"] == w.split()[1] and g["background"] == w.split()[-2] for g, w in zip(got, prompts))
    assert bundle.defaults == ("lcm", 4, bundle.default_guidance) and hits >= 3, got


def test_lcm_card_table_comes_from_the_committed_results():
    root = Path(__file__).resolve().parents[1]
    table = (root / "reports" / "lcm" / "results.md").read_text()
    assert table in (registry.WEIGHTS / "lcm" / "README.md").read_text()
    results = read_results(root / "reports" / "lcm" / "results.json")
    lcm4 = next(r for r in results["rows"] if r["model"] == "lcm" and r["steps"] == 4)
    g = Bundle.load(registry.WEIGHTS / "lcm").defaults[2]  # the preset samples the LCM at its own default g
    assert lcm4["guidance"] == g and f"| lcm | lcm | 4 | {g:g} | {100 * lcm4['attribute_accuracy']['colour']:.1f} |" in table
    # the card's numbers were sampled on the timesteps the shipped LCM uses by default
    assert results["timestep_schedules"] == {"lcm": sampling_schedule(registry.WEIGHTS / "lcm")}
