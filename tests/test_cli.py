import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latentcm.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_generate_writes_a_grid(micro_teacher, tmp_path, capsys):
    out = tmp_path / "g.png"
    main(["generate", "a red circle", "--model", str(micro_teacher), "--steps", "2", "--num-images", "3",
          "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (3 * 64, 64)


@pytest.mark.parametrize("args, needle", [
    (["generate", "a red circle", "--model", "/no/such/folder"], "not a diffusers model folder"),
    (["generate", "a red circle", "--steps", "0"], "--steps"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "a red circle", "--sampler", "euler"], "--sampler"),
    (["train-teacher", "bogus"], "bogus"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lcm: error:") and needle in err
    assert "Traceback" not in err


def test_size_not_divisible_by_vae_factor(micro_teacher, capsys):
    code, _, err = run(["generate", "a red circle", "--model", str(micro_teacher), "--height", "30",
                        "--width", "64", "--steps", "1"], capsys)
    assert code == 2 and "divisible by the VAE factor 4" in err and err.count("\n") == 1


def test_models_json_is_an_object_of_folders():
    out = subprocess.run([sys.executable, "-m", "latentcm.cli", "models", "--json"], capture_output=True,
                         text=True, check=True).stdout
    found = json.loads(out)
    assert isinstance(found, dict)
    assert all(isinstance(v, str) for v in found.values())


def test_cli_generate_equals_diffusers_pipeline_on_micro_teacher(micro_teacher, tmp_path):
    """Our CFG sampling loop (per-image seeds) reproduces diffusers' own pipeline."""
    from diffusers import StableDiffusionPipeline

    from latentcm.sampling.teacher import initial_latents

    out = tmp_path / "ours.png"
    main(["generate", "a blue star on a white background", "--model", str(micro_teacher), "--steps", "5",
          "--guidance", "4", "--seed", "11", "--num-images", "1", "--out", str(out)])
    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents([11], (4, 16, 16))
    ref = pipe("a blue star on a white background", num_inference_steps=5, guidance_scale=4,
               latents=latents, output_type="np").images[0]
    ours = np.asarray(Image.open(out)).astype(np.float32) / 255
    assert np.abs(ours - ref).max() <= 1.5 / 255


@pytest.mark.parametrize("message, expected", [
    ("steps must be in 1..8 for this LCM", "--steps must be in 1..8 for this LCM"),
    ("guidance_max_t is for teacher samplers", "--guidance-max-t is for teacher samplers"),
    ("'gamma' needs the lcm sampler", "--gamma needs the lcm sampler"),
    ("the LCM takes at most 8 steps", "the LCM takes at most 8 steps"),  # names no parameter: unchanged
])
def test_library_errors_naming_a_parameter_name_its_flag(message, expected):
    from latentcm.cli.options import UserError, flag_error

    err = flag_error(ValueError(message))
    assert isinstance(err, UserError) and err.exit_code == 2 and err.format_message() == expected


def test_a_parameter_attribute_names_the_flag():
    from latentcm.cli.options import flag_error
    from latentcm.errors import ModelError

    err = ModelError("must be at most 8 for this LCM")
    err.param = "steps"
    assert flag_error(err).format_message() == "--steps: must be at most 8 for this LCM"
