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
