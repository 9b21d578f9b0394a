"""The real-CFG LCM mode: distilled on the unguided ODE without a w input, sampled with classifier-free guidance
(two passes a step, negative prompts), exported as a StableDiffusionPipeline folder with an LCMScheduler."""
import json

import pytest
import torch

from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.errors import ModelError
from latentcm.sampling.student import sample_student
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.recipes import lcd_config


@pytest.fixture(scope="module")
def cfg_lcm(micro_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg-lcm") / "lcm"
    main(["distill", "--guidance-mode", "cfg", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2",
          "--batch-size", "2", "--num-data", "4", "--validate-every", "0", "--lr", "1e-3"])
    return out


def test_config_defaults_and_refusals():
    cfg = lcd_config("distill", guidance_mode="cfg")
    assert (cfg.omega_min, cfg.omega_max, cfg.empty_prompt_share) == (0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="unguided ODE"):
        LCDConfig(guidance_mode="cfg", omega_min=1.0, omega_max=2.0)
    with pytest.raises(ValueError, match="empty_prompt_share"):
        LCDConfig(empty_prompt_share=1.0)


def test_task_has_no_w_input_drops_prompts_and_runs_one_teacher_pass(micro_bundle, micro_data):
    task = LCDTask(micro_bundle.unet, micro_bundle.scheduler_config, micro_data,
                   lcd_config("distill", guidance_mode="cfg", empty_prompt_share=0.5, batch_size=32))
    assert task.student_unet.config.time_cond_proj_dim is None
    b = task.batch(0)
    empty = (b["text"] == micro_data.uncond_states).flatten(1).all(1)
    assert 5 < int(empty.sum()) < 27 and (b["omega"] == 0).all()
    seen = []
    handle = micro_bundle.unet.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[0]), with_kwargs=True)
    try:
        loss, _ = task.loss(task.batch(1), 1)
    finally:
        handle.remove()
    assert seen == [32] and torch.isfinite(loss)  # w = 0: the conditional pass only, no [cond; uncond] pair
    plain = LCDTask(micro_bundle.unet, micro_bundle.scheduler_config, micro_data, LCDConfig(batch_size=32))
    assert torch.equal(plain.batch(3)["noise"], LCDTask(
        micro_bundle.unet, micro_bundle.scheduler_config, micro_data, LCDConfig(batch_size=32)).batch(3)["noise"])


def test_export_is_a_stable_diffusion_folder_with_an_lcm_scheduler(cfg_lcm):
    index = json.loads((cfg_lcm / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "LCMScheduler"
    assert json.loads((cfg_lcm / "unet" / "config.json").read_text())["time_cond_proj_dim"] is None
    assert json.loads((cfg_lcm / "sampling.json").read_text())["guidance_mode"] == "cfg"
    card = (cfg_lcm / "README.md").read_text()
    assert "Real-CFG mode" in card and "negative_prompt=" in card
    bundle = Bundle.load(cfg_lcm)
    assert bundle.is_lcm and bundle.guidance_mode == "cfg" and bundle.defaults == ("lcm", 4, 2.0)
    assert bundle.unet_evals_per_image("lcm", 4) == 8


def test_diffusers_stable_diffusion_pipeline_samples_it_like_ours(cfg_lcm):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cfg_lcm, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "a star on a white background", "red"
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    for steps, g in ((1, 2.0), (4, 3.0)):
        gen = torch.Generator().manual_seed(5)
        latents = torch.randn((1, 4, 16, 16), generator=gen)  # draw 0; the step noises are draws 1, 2, ...
        ref = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=g, latents=latents,
                   generator=gen, output_type="latent").images
        ours = sample_student(pipe.unet, dict(pipe.scheduler.config), cond, [5], (4, 16, 16), steps=steps,
                              omega=g - 1, uncond=uncond)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_generate_takes_a_negative_prompt_and_guidance_steers(cfg_lcm):
    bundle = Bundle.load(cfg_lcm)
    prompts, seeds = ["a star on a white background"] * 2, [1, 2]
    plain = bundle.generate(prompts, seeds, steps=2, guidance=2.0)
    negated = bundle.generate(prompts, seeds, steps=2, guidance=2.0, negative_prompt="red")
    unguided = bundle.generate(prompts, seeds, steps=2, guidance=1.0, negative_prompt="red")
    assert not torch.equal(plain, negated)
    assert torch.equal(unguided, bundle.generate(prompts, seeds, steps=2, guidance=1.0))  # g = 1: no uncond term


def test_an_embedding_lcm_still_refuses_a_negative_prompt(micro_lcm):
    with pytest.raises(ModelError, match="real-CFG LCM"):
        Bundle.load(micro_lcm).generate(["a star"], [0], steps=2, negative_prompt="red")


def test_cli_refuses_a_w_range_in_cfg_mode(micro_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--guidance-mode", "cfg", "--omega-max", "3", "--teacher", str(micro_teacher),
              "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "takes no --omega-min" in capsys.readouterr().err


@pytest.mark.parametrize("omega", [0.0, 2.5])
def test_folding_the_w_input_is_exact_at_its_w(micro_lcm, omega):
    from latentcm.guidance import guidance_scale_embedding
    from latentcm.models.denoiser import fold_w_input

    unet = Bundle.load(micro_lcm).unet
    plain = fold_w_input(unet, omega)
    assert plain.config.time_cond_proj_dim is None
    g = torch.Generator().manual_seed(0)
    z, text, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([99, 899])
    with torch.no_grad():
        ref = unet(z, t, text,
                   timestep_cond=guidance_scale_embedding(torch.full((2,), omega), 256)).sample
        ours = plain(z, t, text).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_cfg_mode_continues_from_an_embedding_lcm(micro_teacher, micro_lcm, tmp_path):
    out = tmp_path / "cfg-from-lcm"
    main(["distill", "--guidance-mode", "cfg", "--init-student", str(micro_lcm), "--teacher", str(micro_teacher),
          "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--num-data", "4", "--validate-every", "0"])
    assert Bundle.load(out).guidance_mode == "cfg"


def test_single_file_keeps_the_mode_and_sampling_settings(cfg_lcm, tmp_path):
    from latentcm.export.single_file import load_single_file, save_single_file

    src = Bundle.load(cfg_lcm)
    src.timestep_schedule, src.default_guidance = "refine", 2.5  # not the defaults: the file must carry them
    src.renoise = "keep-means"
    restored = load_single_file(save_single_file(src, tmp_path / "cfg.safetensors"))
    assert restored.sampling_file() == {"timestep_schedule": "refine", "guidance_mode": "cfg", "guidance": 2.5,
                                        "unguided_w0": False, "renoise": "keep-means"}
    assert restored.unet.config.get("time_cond_proj_dim") is None
    options = {"steps": 2, "negative_prompt": "blue"}
    assert torch.equal(restored.generate(["a red circle"], [0], **options), src.generate(["a red circle"], [0], **options))
