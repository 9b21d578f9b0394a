"""One place validates sampling options: every invalid combination gets the same message from
``SamplingOptions`` itself, ``Bundle`` (generate / img2img) and the HTTP service's ``parse_request``.

``INVALID_CASES`` is a module-level table so that other front ends (the command line) can feed it too: each
case's ``message`` names parameters, formatted with ``model`` (the model's folder) and ``vae`` (its VAE factor).
"""
from __future__ import annotations

import base64
import io
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from latentcm.bundle import Bundle
from latentcm.errors import ModelError
from latentcm.sampling.options import ModelTraits, SamplingOptions
from latentcm.serve.validate import BadRequest, Limits, parse_request

PROMPT = "a red circle on a blue background"


class Case(NamedTuple):
    name: str
    options: dict          # SamplingOptions fields (the keywords of Bundle.generate / img2img_latents)
    model: str             # "lcm" or "teacher": the micro model of conftest it is sampled on
    message: str           # the one message, formatted with model= (folder) and vae= (VAE factor)
    serve: dict | None = None  # the same combination as a serve payload (init_image: a PNG); None: not expressible
    bundle: bool = True    # False: Bundle's keywords cannot express it (only SamplingOptions can)
    lora: bool = False     # an LCM-LoRA: SamplingOptions.check_lora (serve's loras); Bundle accepts and ignores it


INVALID_CASES = [
    Case("gamma on a teacher sampler", dict(sampler="ddim", gamma=0.3), "teacher",
         "gamma (TCD sampling) needs an LCM (sampler 'lcm'); teacher samplers do not support it",
         serve={"model": "teacher", "gamma": 0.3}),
    Case("gamma above 1", dict(gamma=1.5), "lcm", "gamma must be in [0, 1], got 1.5", serve={"gamma": 1.5}),
    Case("gamma below 0", dict(gamma=-0.5), "lcm", "gamma must be in [0, 1], got -0.5", serve={"gamma": -0.5}),
    Case("guidance NaN", dict(guidance=math.nan), "lcm", "guidance must be a finite number, got nan",
         serve={"guidance": math.nan}),
    Case("strength 0", dict(strength=0.0), "lcm", "strength must be in (0, 1] (1 = start from pure noise), got 0.0",
         serve={"init_image": True, "strength": 0.0}),
    Case("strength above 1", dict(strength=1.5), "lcm",
         "strength must be in (0, 1] (1 = start from pure noise), got 1.5", serve={"init_image": True, "strength": 1.5}),
    Case("more steps than strength keeps", dict(strength=0.05, steps=4), "lcm",
         "strength 0.05 keeps 2 points of the skipping grid: use at most 2 steps or raise strength",
         serve={"init_image": True, "strength": 0.05, "steps": 4}),
    Case("img2img on a teacher", dict(strength=0.5), "teacher",
         "img2img needs an LCM (sampler 'lcm': an LCM folder or an LCM-LoRA); teacher samplers do not support it",
         serve={"model": "teacher", "init_image": True}),
    Case("guidance with an LCM-LoRA", dict(guidance=5.0), "lcm",
         "an LCM-LoRA has its guidance distilled in (no w embedding); leave out guidance",
         serve={"loras": ["tiny"], "guidance": 5.0}, bundle=False, lora=True),
    Case("guidance interval on an LCM", dict(guidance_max_t=500), "lcm",
         "a guidance interval (guidance_max_t) is for teacher samplers; an LCM's was fixed when it was distilled "
         "(its own guidance_max_t)"),
    Case("timesteps on a teacher sampler", dict(sampler="ddim", timesteps=[999, 499]), "teacher",
         "explicit timesteps are for the LCM sampler; a teacher sampler takes steps"),
    Case("schedule on a teacher sampler", dict(sampler="ddim", schedule="grid"), "teacher",
         "a timestep schedule is for the LCM sampler; a teacher sampler takes steps"),
    Case("steps disagree with timesteps", dict(steps=2, timesteps=[999, 499, 299, 99]), "lcm",
         "steps=2 but 4 timesteps given; pass one of them"),
    Case("timesteps and schedule", dict(timesteps=[999, 499], schedule="refine"), "lcm",
         "pass timesteps or schedule, not both"),
    Case("schedule with img2img", dict(strength=0.5, schedule="refine"), "lcm",
         "timesteps and schedule are for text-to-image; img2img picks its timesteps from strength", bundle=False),
    Case("unknown schedule", dict(schedule="karras"), "lcm", "unknown timestep schedule 'karras'; choose from grid, refine"),
    Case("unknown sampler", dict(sampler="euler"), "lcm",
         "unknown sampler 'euler'; choose from lcm, ddim, dpm-solver, dpm-solver++, ddim-trailing, "
         "dpm-solver-trailing, dpm-solver++-trailing"),
    Case("teacher sampler on an LCM", dict(sampler="ddim"), "lcm",
         "{model} is an LCM: sample it with sampler 'lcm' (teacher samplers would ignore its consistency training), "
         "not 'ddim'"),
    Case("lcm sampler on a teacher", dict(sampler="lcm"), "teacher",
         "the lcm sampler needs an LCM folder, but {model} is a diffusion teacher; use sampler "
         "ddim|dpm-solver|dpm-solver++|ddim-trailing|dpm-solver-trailing|dpm-solver++-trailing"),
    Case("more steps than the grid", dict(steps=51), "lcm",
         "steps must be in 1..50 for {model} (its skipping grid has original_inference_steps=50; 1-8 are the usual "
         "LCM range), got 51"),
    Case("no steps", dict(steps=0), "teacher", "steps must be in 1..1000 for {model}, got 0"),
    Case("negative prompt on an LCM", dict(negative_prompt="red"), "lcm",
         "a negative prompt replaces the unconditional branch of CFG, which this LCM does not run (its guidance is "
         "the w input, distilled from CFG with the empty prompt, and it was not distilled from w = 0); use a teacher "
         "sampler, a real-CFG LCM (guidance_mode 'cfg') or an LCM distilled from w = 0 (omega_min 0) for negative_prompt",
         serve={"negative_prompt": "red"}),
    Case("negative prompt not a string", dict(sampler="ddim", negative_prompt=["red"]), "teacher",
         "negative_prompt must be a string, got list", serve={"model": "teacher", "negative_prompt": ["red"]}),
    Case("renoise with gamma", dict(gamma=0.3, renoise="keep-means"), "lcm",
         "renoise is LCM Algorithm 3's; TCD sampling (gamma) re-noises by its own rule",
         serve={"gamma": 0.3, "renoise": "keep-means"}),
    Case("renoise on a teacher sampler", dict(sampler="ddim", renoise="keep-means"), "teacher",
         "renoise is the LCM sampler's; teacher samplers do not re-noise",
         serve={"model": "teacher", "renoise": "keep-means"}),
    Case("unknown renoise", dict(renoise="ddpm"), "lcm", "unknown renoise 'ddpm'; choose from fresh, keep-means",
         serve={"renoise": "ddpm"}),
    Case("size off the VAE factor", dict(height=17, width=17), "lcm",
         "height and width must be divisible by the VAE factor {vae}, got 17x17"),
]


@pytest.fixture(scope="module")
def bundles(micro_lcm, micro_teacher):
    return {"lcm": Bundle.load(micro_lcm), "teacher": Bundle.load(micro_teacher)}


def _message(case: Case, bundle: Bundle) -> str:
    return case.message.format(model=bundle.path, vae=bundle.vae_factor)


def _png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bundle_call(bundle: Bundle, options: dict):
    if "strength" in options:
        side = bundle.default_size
        return bundle.img2img_latents([PROMPT], [0], torch.zeros(1, 3, side, side), **options)
    return bundle.generate([PROMPT], [0], **options)


@pytest.mark.parametrize("case", INVALID_CASES, ids=[c.name for c in INVALID_CASES])
def test_one_message_from_options_bundle_and_serve(case, bundles):
    bundle = bundles[case.model]
    expected = _message(case, bundle)
    with pytest.raises(ModelError) as direct:
        options = SamplingOptions(**case.options)
        options.check_lora() if case.lora else options.resolve(bundle.traits)
    assert str(direct.value) == expected
    if case.bundle:
        with pytest.raises(ModelError) as from_bundle:
            _bundle_call(bundle, case.options)
        assert str(from_bundle.value) == expected
    if case.serve is not None:
        payload = {"prompt": PROMPT, **case.serve}
        if payload.get("init_image"):
            payload["init_image"] = _png()
        with pytest.raises(BadRequest) as from_serve:
            parse_request(payload, Limits(), ("tiny",))
        assert str(from_serve.value) == expected and from_serve.value.status == 400


def test_messages_name_parameters_not_flags():
    assert not any("--" in case.message for case in INVALID_CASES)


def test_resolve_fills_the_model_defaults_and_keeps_the_rest():
    lcm = ModelTraits(is_lcm=True, original_inference_steps=50, default_size=64, timestep_schedule="refine")
    o = SamplingOptions(gamma=0.2).resolve(lcm)
    assert (o.sampler, o.steps, o.guidance, o.gamma, o.schedule, o.height, o.width) == ("lcm", 4, 8.5, 0.2, "refine",
                                                                                      64, 64)
    assert SamplingOptions(timesteps=[999, 499]).resolve(lcm).steps == 2
    assert SamplingOptions(timesteps=[999, 499]).resolve(lcm).schedule is None
    img = SamplingOptions(strength=0.5).resolve(lcm)
    assert img.schedule is None and img.height is None and img.strength == 0.5
    teacher = SamplingOptions().resolve(ModelTraits(is_lcm=False))
    assert (teacher.sampler, teacher.steps, teacher.guidance, teacher.schedule) == ("ddim", 50, 7.5, None)
    assert o.resolve(lcm) == o  # resolving is idempotent
    with pytest.raises(Exception):
        o.steps = 3  # frozen


def test_bundle_takes_the_options_as_one_object(bundles):
    lcm = bundles["lcm"]
    given = SamplingOptions(steps=2, guidance=3.0)
    torch.testing.assert_close(lcm.sample_latents([PROMPT], [1], options=given),
                               lcm.sample_latents([PROMPT], [1], steps=2, guidance=3.0), rtol=0, atol=0)
    with pytest.raises(TypeError, match="not both"):
        lcm.generate([PROMPT], [1], steps=2, options=given)


# --- the command line: the same rules through `lcm generate`, parameters named as flags ------------------
# Cases click's own option types refuse first (ranges, choices): their message is click's, about the flag.
CLICK_TYPED = {"gamma above 1", "gamma below 0", "guidance NaN", "strength 0", "strength above 1", "unknown schedule",
               "unknown sampler", "no steps", "unknown renoise",
               "negative prompt not a string"}  # (a flag's value is always a string)


def _cli_args(case: Case, init_image: str) -> list[str]:
    args = []
    for key, value in case.options.items():
        if key == "strength":
            args += ["--init-image", init_image]
        if key == "timesteps":
            value = ",".join(map(str, value))
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + (["--lora", "any-adapter"] if case.lora else [])


@pytest.mark.parametrize("case", [c for c in INVALID_CASES if c.name not in CLICK_TYPED],
                         ids=[c.name for c in INVALID_CASES if c.name not in CLICK_TYPED])
def test_the_command_line_gives_the_same_message_with_flags(case, bundles, tmp_path, capsys):
    from latentcm.cli import main
    from latentcm.cli.options import flag_error

    bundle = bundles[case.model]
    image = tmp_path / "init.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", PROMPT, "--model", str(bundle.path), "--num-images", "1", "--out", str(tmp_path / "x.png"),
              *_cli_args(case, str(image))])
    assert exit_.value.code == 2
    expected = flag_error(ModelError(_message(case, bundle))).message
    assert capsys.readouterr().err.strip() == f"lcm: error: {expected}"
    assert not (tmp_path / "x.png").exists()


def test_every_option_has_its_flag():
    """The CLI's parameter -> flag map covers every SamplingOptions field (it is written out to keep torch out
    of `lcm --help`)."""
    import dataclasses

    from latentcm.cli.options import FLAGS

    assert set(FLAGS) == {f.name for f in dataclasses.fields(SamplingOptions)}
