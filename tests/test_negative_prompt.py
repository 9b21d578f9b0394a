"""Negative prompts: the text of CFG's unconditional branch, for teacher samplers (an LCM refuses one, see
tests/test_sampling_options.py), checked against diffusers' StableDiffusionPipeline(negative_prompt=...)."""
import torch

from latentcm.bundle import Bundle
from latentcm.sampling.teacher import initial_latents
from latentcm.serve.validate import Limits, parse_request

PROMPTS = ["a red circle on a blue background", "a green ring"]


def test_teacher_negative_prompt_equals_diffusers(micro_teacher):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    b = Bundle.load(micro_teacher)
    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    seeds, negative = [0, 1], "a blue square on a red background"
    ours = b.generate(PROMPTS, seeds, "ddim", 3, 4.0, negative_prompt=negative)
    ref = pipe(PROMPTS, negative_prompt=[negative] * 2, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
               latents=initial_latents(seeds, b.latent_shape(64, 64))).images  # [B, 3, H, W] in [0, 1]
    torch.testing.assert_close(ours, ref * 2 - 1, rtol=0, atol=1e-4)
    plain = b.generate(PROMPTS, seeds, "ddim", 3, 4.0)
    assert (ours - plain).abs().max() > 1e-2  # the negative steers
    torch.testing.assert_close(b.generate(PROMPTS, seeds, "ddim", 3, 4.0, negative_prompt=""), plain, rtol=0, atol=0)


def test_negative_prompt_through_the_command_line(micro_teacher, tmp_path):
    from latentcm.cli import main
    from PIL import Image
    import numpy as np

    out = tmp_path / "neg.png"
    main(["generate", PROMPTS[0], "--model", str(micro_teacher), "--steps", "3", "--num-images", "1",
          "--negative-prompt", "blue", "--out", str(out)])
    expected = Bundle.load(micro_teacher).generate(PROMPTS[:1], [0], "ddim", 3, negative_prompt="blue")
    got = torch.from_numpy(np.asarray(Image.open(out), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (got - expected[0]).abs().max() <= 1 / 127.5 + 1e-6  # the PNG's 8-bit rounding


def test_serve_carries_the_negative_prompt_and_batches_it_apart():
    a = parse_request({"prompt": PROMPTS[0], "model": "teacher", "negative_prompt": "blue"}, Limits())
    b = parse_request({"prompt": PROMPTS[0], "model": "teacher"}, Limits())
    assert a.options.negative_prompt == "blue" and b.options.negative_prompt is None
    assert a.batch_key != b.batch_key


def test_evaluation_rows_carry_the_negative_prompt(micro_teacher, micro_lcm, tmp_path):
    """A Row's options reach Bundle.generate through the cached generation; an LCM row refuses one up front."""
    import pytest

    from latentcm.errors import ModelError
    from latentcm.evaluation.generation import generate_cached
    from latentcm.evaluation.pipeline import Row
    from latentcm.images import to_pixels

    b = Bundle.load(micro_teacher)
    row = Row("teacher", "ddim", 2, 4.0, negative_prompt="blue")
    assert row.key != row._replace(negative_prompt=None).key and row.options.negative_prompt == "blue"
    images, _ = generate_cached(b, row, PROMPTS, 0, tmp_path)
    np_expected = to_pixels(b.generate(PROMPTS, [0, 1], "ddim", 2, 4.0, negative_prompt="blue"))
    assert (images == np_expected).all()
    with pytest.raises(ModelError, match="negative prompt"):
        generate_cached(Bundle.load(micro_lcm), Row("lcm", "lcm", 2, 4.0, negative_prompt="blue"), PROMPTS, 0,
                        tmp_path)
    assert not list(tmp_path.glob("lcm-*"))  # nothing written for the refused row


def _w0_lcm(micro_lcm) -> Bundle:
    b = Bundle.load(micro_lcm)
    return b.use_sampling({**b.sampling_file(), "unguided_w0": True})


def test_lcm_from_w0_takes_a_negative_prompt_as_real_cfg_at_w0(micro_lcm):
    """One step of the consistency sampler returns the guided x0 itself: with a negative prompt at scale g it is
    f(neg, w=0) + g (f(prompt, w=0) - f(neg, w=0)), each f read at w = 0 (g = 1 without a negative)."""
    b, seeds, negative = _w0_lcm(micro_lcm), [0, 1], "a blue square on a red background"
    guided = b.sample_latents(PROMPTS, seeds, "lcm", 1, 3.0, negative_prompt=negative)
    f_c = b.sample_latents(PROMPTS, seeds, "lcm", 1, 1.0)
    f_n = b.sample_latents([negative] * 2, seeds, "lcm", 1, 1.0)
    torch.testing.assert_close(guided, f_n + 3.0 * (f_c - f_n), rtol=0, atol=1e-4)
    assert (guided - f_c).abs().max() > 1e-3  # the negative steers
    two_steps = b.generate(PROMPTS, seeds, "lcm", 2, 1.0, negative_prompt=negative)
    torch.testing.assert_close(two_steps, b.generate(PROMPTS, seeds, "lcm", 2, 1.0), rtol=0, atol=1e-4)  # g = 1: f_c


def test_lcm_from_w0_defaults_to_a_small_cfg_scale_with_a_negative(micro_lcm):
    from latentcm.defaults import CFG_LCM_GUIDANCE

    b = _w0_lcm(micro_lcm)
    assert b.sampling_options(negative_prompt="red").guidance == CFG_LCM_GUIDANCE
    assert b.sampling_options().guidance == Bundle.load(micro_lcm).sampling_options().guidance  # no negative: as before
    request = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 2}
    assert parse_request(request, Limits(lcm_unguided_w0=True)).options.negative_prompt == "blue"
    assert parse_request(request, Limits(lcm_guidance_mode="cfg")).options.negative_prompt == "blue"


def test_distilling_from_w0_marks_the_lcm_and_its_card(micro_teacher, tmp_path):
    import json

    from latentcm.cli import main

    out = tmp_path / "from-w0"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--omega-min", "0", "--omega-max", "3",
          "--max-steps", "1", "--batch-size", "2", "--num-data", "4", "--validate-every", "0"])
    assert json.loads((out / "sampling.json").read_text())["unguided_w0"] is True
    assert "negative prompt (`lcm generate --negative-prompt`)" in (out / "README.md").read_text()
    b = Bundle.load(out)
    assert b.unguided_w0 and b.generate(PROMPTS[:1], [0], steps=1, negative_prompt="blue").shape[0] == 1
    main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "from-w1"), "--omega-min", "1",
          "--max-steps", "1", "--batch-size", "2", "--num-data", "4", "--validate-every", "0"])
    assert "unguided_w0" not in json.loads((tmp_path / "from-w1" / "sampling.json").read_text())


def test_sampling_file_checks_unguided_w0(tmp_path):
    import pytest

    from latentcm.bundle import ModelError, parse_sampling

    assert parse_sampling('{"unguided_w0": true}', "s.json")["unguided_w0"] is True
    for bad in ('{"unguided_w0": "yes"}', '{"unguided_w0": true, "guidance_mode": "cfg"}'):
        with pytest.raises(ModelError, match="unguided_w0 must be true or false"):
            parse_sampling(bad, "s.json")


def test_a_guided_one_pass_teacher_is_not_unguided_at_w0():
    from latentcm.export.pipeline import unguided_w0

    lcd = {"guidance_mode": "embedding", "omega_min": 0.0}
    assert unguided_w0({"lcd": lcd}) and not unguided_w0({"lcd": lcd, "guided_teacher": "runs/guided"})
    assert not unguided_w0({"lcd": {**lcd, "omega_min": 1.0}}) and not unguided_w0({"lcd": {**lcd, "guidance_mode": "cfg"}})
