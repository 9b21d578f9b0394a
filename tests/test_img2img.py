"""LCM img2img: timestep selection and latents against diffusers, and the CLI's --init-image."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentcm.cli import main
from latentcm.images import fit_cover, load_image
from latentcm.bundle import Bundle, ModelError
from latentcm.schedules import lcm_timesteps

PROMPT = "a red circle on a blue background"


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8, 1.0])
def test_timesteps_equal_lcm_scheduler_with_strength(strength):
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for steps in range(1, 9):
        sched.set_timesteps(steps, strength=strength)
        assert torch.equal(lcm_timesteps(steps, strength=strength), sched.timesteps), (steps, strength)


def test_timesteps_refuse_bad_strength_and_too_many_steps():
    for strength in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            lcm_timesteps(4, strength=strength)
    with pytest.raises(ValueError, match="exceeds"):
        lcm_timesteps(6, strength=0.1)  # int(50 * 0.1) = 5 grid points


def test_fit_cover_resizes_and_centre_crops():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left quarter is cropped away
    out = fit_cover(image, 16, 16)
    assert out.size == (16, 16) and np.asarray(out)[:, 1:, 2].max() == 0  # (bicubic bleeds into column 0)


@pytest.fixture(scope="module")
def lcm_bundle(micro_lcm):
    return Bundle.load(micro_lcm)


@pytest.fixture(scope="module")
def init_png(lcm_bundle, tmp_path_factory):
    size = lcm_bundle.default_size
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("i2i") / "init.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_encoding_matches_diffusers_preprocess_and_posterior_mode(micro_lcm, lcm_bundle, init_png):
    from diffusers import LatentConsistencyModelImg2ImgPipeline
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img import retrieve_latents

    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(micro_lcm, local_files_only=True)
    size = lcm_bundle.default_size
    ours = load_image(init_png, size, size)
    ref = pipe.image_processor.preprocess(Image.open(init_png))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        z_ref = retrieve_latents(pipe.vae.encode(ref), sample_mode="argmax") * pipe.vae.config.scaling_factor
    torch.testing.assert_close(lcm_bundle.encode_images(ours), z_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps, strength", [(1, 0.5), (2, 0.3), (4, 0.5), (4, 0.8), (3, 1.0)])
def test_img2img_latents_equal_diffusers_pipeline(micro_lcm, lcm_bundle, init_png, steps, strength):
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(micro_lcm, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    size = lcm_bundle.default_size
    images = load_image(init_png, size, size)  # [1, 3, H, W]
    seeds = [3, 7]
    ours = lcm_bundle.img2img_latents([PROMPT] * 2, seeds, images, strength, steps=steps, guidance=8.5)
    # Given 4-channel latents the pipeline skips its VAE posterior draw, so each generator's draw 0 noises
    # the image latent and draws 1, 2, ... are the step noises -- our per-seed stream.
    x0 = lcm_bundle.encode_images(images).expand(2, -1, -1, -1)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ref = pipe([PROMPT] * 2, image=x0, num_inference_steps=steps, strength=strength, guidance_scale=8.5,
               generator=gens, output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_img2img_image_b_depends_on_its_seed_only(lcm_bundle, init_png):
    size = lcm_bundle.default_size
    images = load_image(init_png, size, size)
    both = lcm_bundle.img2img_latents([PROMPT] * 2, [1, 2], images, 0.6, steps=2)
    one = lcm_bundle.img2img_latents([PROMPT], [2], images, 0.6, steps=2)
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-5)


def test_img2img_refuses_teacher_and_bad_strength(micro_teacher, lcm_bundle):
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ModelError, match="needs an LCM"):
        Bundle.load(micro_teacher).img2img_latents([PROMPT], [0], images, 0.5)
    with pytest.raises(ModelError, match="strength"):
        lcm_bundle.img2img_latents([PROMPT], [0], images, 0.0)


def test_generate_cli_init_image_writes_a_grid(micro_lcm, init_png, tmp_path, capsys):
    out = tmp_path / "i2i.png"
    main(["generate", PROMPT, "--model", str(micro_lcm), "--init-image", str(init_png), "--strength", "0.6",
          "--steps", "2", "--num-images", "2", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out) and Image.open(out).size[0] > 0


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("strength0", "--strength"),
    ("strength2", "--strength"),
    ("strength-alone", "--strength needs --init-image"),
    ("teacher", "needs an LCM"),
    ("not-an-image", "cannot read init image"),
    ("too-many-steps", "use at most 5 steps"),
])
def test_generate_cli_img2img_bad_input_is_one_line_and_exit_2(micro_lcm, micro_teacher, init_png, tmp_path,
                                                              capsys, case, needle):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    image = {"missing": tmp_path / "nope.png", "not-an-image": bad}.get(case, init_png)
    args = ["generate", PROMPT, "--model", str(micro_teacher if case == "teacher" else micro_lcm),
            "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "x.png")]
    args += {"strength0": ["--strength", "0"], "strength2": ["--strength", "1.5"],
             "too-many-steps": ["--strength", "0.1", "--steps", "8"]}.get(case, [])
    if case != "strength-alone":
        args += ["--init-image", str(image)]
    else:
        args += ["--strength", "0.5"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and needle in err, err
