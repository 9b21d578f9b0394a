"""The LCM sampler's timestep schedules: diffusers' grid selection and the refine schedule (after the first step,
every step at low noise), the folder file that names a model's own, and the rows and exports that carry it."""
import json
import shutil

import pytest
import torch

from latentcm import registry
from latentcm.bundle import SAMPLING_FILE, Bundle
from latentcm.cli import main
from latentcm.errors import ModelError
from latentcm.evaluation import pipeline, references
from latentcm.evaluation import results as results_file
from latentcm.sampling.student import inference_timesteps
from latentcm.schedules import lcm_timesteps, refine_timesteps

REFINE_10 = {1: [999], 2: [999, 499], 3: [999, 499, 99], 4: [999, 499, 299, 99], 5: [999, 499, 366, 232, 99],
             6: [999, 499, 399, 299, 199, 99], 8: [999, 499, 432, 366, 299, 232, 166, 99],
             10: [999, 499, 449, 399, 349, 299, 249, 199, 149, 99]}


def test_refine_timesteps_one_step_from_noise_then_evenly_down_the_low_noise_half():
    for n, want in REFINE_10.items():
        assert refine_timesteps(n, 1000, 10).tolist() == want
    for n in (1, 2):  # 1 and 2 steps: diffusers' own selection
        assert torch.equal(refine_timesteps(n, 1000, 10), lcm_timesteps(n, 1000, 10))
    assert refine_timesteps(4, 1000, 50).tolist() == [999, 499, 259, 19]  # the 50-point grid: k - 1 = 19 last
    for n in range(1, 51):
        ts = refine_timesteps(n, 1000, 50)
        assert len(ts) == n and ts[0] == 999 and (n <= 2 or ts[-1] == 19) and bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError, match="1..10"):
        refine_timesteps(11, 1000, 10)
    assert refine_timesteps(2, 1000, 3).tolist() == [998, 332]  # grid 332, 665, 998: midpoint 332 is its lowest
    assert refine_timesteps(3, 1000, 3).tolist() == lcm_timesteps(3, 1000, 3).tolist()  # no room: diffusers' pick
    assert inference_timesteps("grid", 4, 1000, 10, 0.5).tolist() == lcm_timesteps(4, 1000, 10, 0.5).tolist()
    with pytest.raises(ValueError, match="text-to-image"):
        inference_timesteps("refine", 4, 1000, 10, 0.5)
    with pytest.raises(ValueError, match="unknown timestep schedule"):
        inference_timesteps("karras", 4, 1000, 10)


@pytest.fixture()
def refine_lcm(micro_lcm, tmp_path):
    """A copy of the micro LCM whose sampling.json asks for the refine schedule."""
    folder = tmp_path / "lcm"
    shutil.copytree(micro_lcm, folder)
    (folder / SAMPLING_FILE).write_text(json.dumps({"timestep_schedule": "refine"}))
    return folder


def test_a_folder_names_its_schedule_and_generate_follows_it(micro_lcm, refine_lcm):
    plain, refine = Bundle.load(micro_lcm), Bundle.load(refine_lcm)
    assert plain.timestep_schedule == "grid" and refine.timestep_schedule == "refine"
    args = (["a red circle", "a blue star"], [0, 1], "lcm", 4, 8.5)
    explicit = refine.sample_latents(*args[:2], "lcm", None, 8.5, timesteps=[999, 499, 259, 19])  # 50-point grid
    torch.testing.assert_close(refine.sample_latents(*args), explicit, rtol=0, atol=0)
    torch.testing.assert_close(refine.sample_latents(*args, schedule="grid"), plain.sample_latents(*args),
                               rtol=0, atol=0)
    assert not torch.allclose(refine.sample_latents(*args), plain.sample_latents(*args))
    with pytest.raises(ModelError, match="LCM sampler"):
        Bundle.load(registry.resolve("teacher")).sample_latents(["a red circle"], [0], "ddim", 2, 7.5, schedule="grid")


@pytest.mark.parametrize("text, needle", [("[1, 2]", "JSON object"), ('{"timestep_schedule": "karras"}', "one of")])
def test_a_bad_sampling_file_is_a_model_error(refine_lcm, text, needle):
    (refine_lcm / SAMPLING_FILE).write_text(text)
    with pytest.raises(ModelError, match=needle):
        Bundle.load(refine_lcm)


def test_shipped_lcm_samples_refine_timesteps_as_diffusers_does_given_them():
    from diffusers import LatentConsistencyModelPipeline

    folder = registry.shipped_models()["lcm"]
    bundle = Bundle.load(folder)
    assert bundle.timestep_schedule == "refine"
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 16, 16), generator=g)
    timesteps = refine_timesteps(4, 1000, bundle.original_inference_steps).tolist()
    ref = pipe("a large red star on a blue background", timesteps=timesteps, guidance_scale=bundle.defaults[2],
               latents=latents, generator=g, output_type="latent").images
    ours = bundle.sample_latents(["a large red star on a blue background"], [3])  # defaults: 4 steps, its own g
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_release_export_keeps_the_schedule_and_its_card_passes_the_timesteps(refine_lcm, tmp_path):
    out = tmp_path / "release"
    main(["export", "--model", str(refine_lcm), "--out", str(out)])
    assert json.loads((out / SAMPLING_FILE).read_text()) == {"timestep_schedule": "refine"}
    assert Bundle.load(out).timestep_schedule == "refine"
    use = (out / "README.md").read_text().split("## Source model card")[0]
    assert "timesteps=[999, 499, 259, 19]" in use and "num_inference_steps=4" not in use


def test_evaluate_scores_each_named_schedule_and_caches_by_schedule(refine_lcm, micro_teacher, micro_judge,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(refine_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
            "--samplers", "lcm", "--steps", "4", "--num-samples", "4", "--batch-size", "4", "--out", str(out)]
    main([*args, "--lcm-schedules", "grid,refine"])
    results = json.loads((out / "results.json").read_text())
    results_file.validate_results(results)
    assert [r.get("schedule") for r in results["records"]] == ["grid", "refine"]
    assert results["records"][0]["fid"] != results["records"][1]["fid"]
    table = (out / "table1.md").read_text()
    assert "| LCM, w 7.5, grid timesteps |" in table and "| LCM, w 7.5, refine timesteps |" in table
    main(args)  # no named schedule: the folder's own (refine) -- sampled anew, not the grid row's cache
    again = json.loads((out / "results.json").read_text())
    own = again["records"][0]
    assert "schedule" not in own and own["fid"] == results["records"][1]["fid"]
    assert again["timestep_schedules"] == {"lcm": "refine"}  # what the unnamed rows sampled with
    assert pipeline.Row("lcm", "lcm", 4, 8.5, schedule="refine").key == "lcm-lcm-4-g8.5-refine"


@pytest.mark.parametrize("args, needle", [
    (["generate", "a red circle", "--schedule", "refine", "--timesteps", "999,99"], "not both"),
    (["generate", "a red circle", "--schedule", "karras"], "--schedule"),
    (["evaluate", "--preset", "lcm", "--lcm-schedules", "grid"], "table1 preset"),
    (["evaluate", "--lcm-schedules", "grid,karras"], "--lcm-schedules"),
])
def test_schedule_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1]
