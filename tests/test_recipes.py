"""The training layer after the re-cut: recipes as data, the LoRA variant through LCDTask's constructor,
plain diffusion on the teacher's own schedule and parameterization, and the one k <-> N rule."""
import pytest
import torch

from latentcm import parameterization as P
from latentcm import schedules
from latentcm.bundle import Bundle
from latentcm.models.components import tiny_sd_pipeline
from latentcm.models.denoiser import COND_PROJ_KEY, make_student
from latentcm.models.lora import LoRAConfig
from latentcm.training import recipes
from latentcm.training.consistency import LCDConfig, LCDTask, LoRATask
from latentcm.training.data.tensors import LCDData
from latentcm.training.diffusion import UNetTask, min_snr_weight


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return LCDData(torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 8, 32, generator=g),
                   torch.randn(1, 8, 32, generator=g))


def test_every_cli_training_job_is_a_recipe_row():
    assert set(recipes.RECIPES) == {"distill", "distill-lora", "finetune", "finetune-teacher", "distill-guidance"}
    assert recipes.RECIPES["finetune"].source_kind == "lcm"
    assert {r.source_kind for n, r in recipes.RECIPES.items() if n != "finetune"} == {"teacher"}


def test_recipe_refuses_the_wrong_kind_of_source(micro_teacher, micro_lcm, tmp_path):
    from latentcm.errors import ModelError
    from latentcm.training.loop import LoopConfig

    with pytest.raises(ModelError, match="diffusion teacher"):
        recipes.run("finetune", recipes.Job(micro_teacher, tmp_path / "a", LoopConfig(max_steps=1),
                                            lcd=LCDConfig(target="same-noise"), data_dir=tmp_path))
    with pytest.raises(ModelError, match="is an LCM"):
        recipes.run("distill", recipes.Job(micro_lcm, tmp_path / "b", LoopConfig(max_steps=1), lcd=LCDConfig()))


@pytest.mark.parametrize("init", ["zero", "default"])
def test_cond_proj_init(init):
    teacher = tiny_sd_pipeline().unet
    student = make_student(teacher, 16, cond_proj_init=init)
    weight = dict(student.named_parameters())[COND_PROJ_KEY]
    assert (weight.abs().sum() == 0) == (init == "zero")
    # every other weight is the teacher's
    t = teacher.state_dict()
    assert all(torch.equal(v, t[k]) for k, v in student.state_dict().items() if k != COND_PROJ_KEY)
    with pytest.raises(ValueError, match="cond_proj_init"):
        make_student(teacher, 16, cond_proj_init="ones")


def test_lora_task_keeps_the_max_timestep_filter():
    """LoRATask now runs LCDTask's constructor (super()), so max_timestep restricts its grid too."""
    pipe = tiny_sd_pipeline()
    cfg = LCDConfig(batch_size=64, skip=20, max_timestep=499, omega_min=7.5, omega_max=7.5)
    task = LoRATask(pipe.unet, dict(pipe.scheduler.config), _data(), cfg, LoRAConfig(rank=2))
    assert int(task.grid.max()) <= 499 and len(task.grid) == 25
    assert int(task.batch(0)["t_start"].max()) <= 499
    full = LCDTask(tiny_sd_pipeline().unet, dict(pipe.scheduler.config), _data(), LCDConfig(skip=20))
    assert len(full.grid) == 50


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_plain_diffusion_trains_the_models_own_parameterization(prediction_type):
    """The loss target is the network output of the teacher's prediction type, on the teacher's betas."""
    pipe = tiny_sd_pipeline(prediction_type=prediction_type)
    config = {**dict(pipe.scheduler.config), "beta_end": 0.02}  # not the shipped schedule
    task = UNetTask(pipe.unet, pipe.unet, pipe.text_encoder, pipe.tokenizer, _data().latents, None, 0, 2,
                    scheduler_config=config, captions=["a red circle"] * 4)
    torch.testing.assert_close(task.alpha_bar, schedules.alphas_cumprod_from_config(config).float())
    batch = task.batch(0)
    a = task.alpha_bar[batch["t"]]
    z_t = schedules.add_noise(batch["z0"], batch["noise"], a)
    with torch.no_grad():
        out = pipe.unet(z_t, batch["t"], batch["text"]).sample
        loss, _ = task.loss(batch, 0)
    target = {"epsilon": batch["noise"], "sample": batch["z0"],
              "v_prediction": P.append_dims(a.sqrt(), out) * batch["noise"]
              - P.append_dims((1 - a).sqrt(), out) * batch["z0"]}[prediction_type]
    weight = min_snr_weight(schedules.snr(a), 5.0, prediction_type)
    expected = (weight * (out - target).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))


def test_one_k_n_rule():
    assert schedules.grid_size(1000, 20) == 50 and schedules.skip_of(1000, 50) == 20
    assert schedules.training_grid(1000, 20).tolist() == schedules.skipping_grid(1000, 50).tolist()
    with pytest.raises(ValueError, match="nearest valid"):
        schedules.grid_size(1000, 300)
    cfg = schedules.lcm_scheduler_config({"num_train_timesteps": 1000, "prediction_type": "v_prediction"}, 25)
    assert cfg["original_inference_steps"] == 40 and cfg["prediction_type"] == "v_prediction"


def test_bundle_declares_its_loras(micro_teacher, tmp_path):
    """A Bundle declares exactly the LoRAs stacked onto it (resolved path, weight), in order; none without."""
    from latentcm.models.lora import ADAPTER, add_lora, save_diffusers_lora

    unet = tiny_sd_pipeline().unet
    add_lora(unet, LoRAConfig(rank=2))
    file = save_diffusers_lora(unet, tmp_path / "lora", ADAPTER)  # folder/pytorch_lora_weights.safetensors
    stacked = Bundle.load(micro_teacher, loras=[(str(file.parent), 0.5), (str(file), 0.25)])
    assert stacked.loras == [(str(file.parent.resolve()), 0.5), (str(file.resolve()), 0.25)]
    assert stacked.is_lcm
    plain = Bundle.load(micro_teacher)
    assert plain.loras == [] and not plain.is_lcm


@pytest.mark.parametrize("args, recipe", [([], "distill"), (["--lora", "4"], "distill-lora")])
def test_cli_distill_and_python_recipes_start_from_the_same_lcd_config(args, recipe, tmp_path, monkeypatch):
    """`lcm distill [--lora]` with its defaults builds the LCDConfig that recipes.lcd_config gives Python callers
    (LCM-LoRA: the fixed w and no target EMA decided in recipes.py, not in the CLI)."""
    from latentcm.cli import main
    from latentcm.defaults import LORA_OMEGA

    jobs = []
    monkeypatch.setattr(recipes, "run", lambda name, job: jobs.append((name, job)) or recipes.Result(0, None, None))
    main(["distill", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "out"), *args])
    (name, job), = jobs
    assert name == recipe and job.lcd == recipes.lcd_config(recipe)
    if recipe == "distill-lora":
        assert (job.lcd.omega_min, job.lcd.omega_max, job.lcd.ema_decay) == (LORA_OMEGA, LORA_OMEGA, 0.0)
        assert job.lora == LoRAConfig(rank=4, alpha=None, seed=0)
    else:
        assert job.lcd == LCDConfig() and job.lora is None


def test_lcd_config_ignores_none_overrides():
    assert recipes.lcd_config("distill-lora", omega_min=None, ema_decay=None) == recipes.lcd_config("distill-lora")
    assert recipes.lcd_config("distill-lora", omega_max=9.0).omega_max == 9.0
    assert recipes.lcd_config("finetune").target == "same-noise"


@pytest.mark.parametrize("command", ["distill", "finetune"])
def test_cli_passes_the_timestep_schedule_to_the_job(command, tmp_path, monkeypatch):
    """`lcm distill|finetune --schedule refine` asks the exporter for refine; without it the recipe decides."""
    from latentcm.cli import main

    from types import SimpleNamespace

    jobs, report = [], SimpleNamespace(summary=lambda: "loaded 0 pairs", skipped={})
    monkeypatch.setattr(recipes, "run", lambda name, job: jobs.append(job) or recipes.Result(0, None, report))
    monkeypatch.setattr(recipes, "lcm_skip", lambda bundle: 20)
    monkeypatch.setattr(recipes, "load_source", lambda path, kind: None)
    base = (["distill", "--teacher", str(tmp_path / "t")] if command == "distill"
            else ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path)])
    main([*base, "--out", str(tmp_path / "a"), "--schedule", "refine", "--renoise", "keep-means"])
    main([*base, "--out", str(tmp_path / "b")])
    assert [job.sampling_schedule for job in jobs] == ["refine", None]
    assert [job.sampling_renoise for job in jobs] == ["keep-means", None]


def test_the_exported_re_noising_is_the_jobs_else_the_source_lcms_else_fresh(tmp_path):
    """``renoise_of``: what --renoise asks for; without it LCF keeps its source LCM's and LCD from a teacher is fresh."""
    from types import SimpleNamespace

    from latentcm.training.loop import LoopConfig

    lcm = SimpleNamespace(is_lcm=True, traits=SimpleNamespace(renoise="keep-means"))
    teacher = SimpleNamespace(is_lcm=False)
    job = recipes.Job(tmp_path, tmp_path / "out", LoopConfig(max_steps=1))
    assert recipes.renoise_of(job, lcm) == "keep-means" and recipes.renoise_of(job, teacher) == "fresh"
    asked = recipes.Job(tmp_path, tmp_path / "out", LoopConfig(max_steps=1), sampling_renoise="fresh")
    assert recipes.renoise_of(asked, lcm) == "fresh"


def test_renoise_with_lora_is_one_line(tmp_path, capsys):
    from latentcm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "o"), "--lora", "4",
              "--renoise", "keep-means"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "an LCM-LoRA folder carries none" in err


def test_run_without_an_lcd_config_uses_the_recipes_defaults(micro_teacher, tmp_path, monkeypatch):
    """A Python Job without ``lcd`` trains with ``lcd_config(recipe)``: the LCM-LoRA's fixed w and no EMA."""
    seen = []
    monkeypatch.setattr(recipes, "fit", lambda task, *a, **k: seen.append(task) or 0)
    from latentcm.training.loop import LoopConfig

    job = recipes.Job(micro_teacher, tmp_path / "out", LoopConfig(max_steps=1), lora=LoRAConfig(rank=2),
                      num_data=4, export=False)
    recipes.run("distill-lora", job)
    assert seen[0].cfg == recipes.lcd_config("distill-lora")
