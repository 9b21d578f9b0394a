"""Latent Consistency Distillation on micro models: student, task, solver target, loop, export, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentcm import world
from latentcm.cli import main
from latentcm.guidance import guidance_scale_embedding
from latentcm.bundle import Bundle
from latentcm.models.denoiser import COND_PROJ_KEY, make_student
from latentcm.sampling.student import sample_student
from latentcm.solvers import SOLVERS, augmented_step
from latentcm.training.checkpoint import list_checkpoints
from latentcm.training.consistency import LCDConfig, LCDTask, distance
from latentcm.schedules import training_grid
from latentcm.training.loop import LoopConfig, fit


@pytest.fixture(scope="module")
def bundle(micro_teacher):
    return Bundle.load(micro_teacher)


@pytest.fixture(scope="module")
def data(micro_data):
    return micro_data


def _task(bundle, data, **kw):
    return LCDTask(bundle.unet, bundle.scheduler_config, data, LCDConfig(**{"batch_size": 2, **kw}))


def _count_calls(module):
    """Batch sizes of every forward of ``module`` (and the hook's handle)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]),
                                              with_kwargs=True)
    return calls, handle


def test_zero_init_student_reproduces_the_teacher(bundle):
    teacher = bundle.unet
    student = make_student(teacher, time_cond_proj_dim=256)
    assert student.config.time_cond_proj_dim == 256
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    t_sd = teacher.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in student.state_dict().items() if k != COND_PROJ_KEY)
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 32, 32, generator=g)
    t = torch.tensor([19, 499, 999])
    w_emb = guidance_scale_embedding(torch.tensor([2.0, 7.5, 14.0]))
    with torch.no_grad():
        assert torch.equal(student(z, t, text, timestep_cond=w_emb).sample, teacher(z, t, text).sample)
    with pytest.raises(ValueError, match="already has time_cond_proj_dim"):
        make_student(student)


def test_batches_are_deterministic_per_step(bundle, data):
    a, b = _task(bundle, data, seed=3), _task(bundle, data, seed=3)
    b3, b3_again, b4 = a.batch(3), b.batch(3), a.batch(4)
    assert b3.keys() == {"z0", "text", "noise", "t_start", "t_end", "omega", "pure_noise", "ode_start",
                         "ode_pair"}
    assert not (b3["pure_noise"].any() or b3["ode_start"].any() or b3["ode_pair"].any())  # none unless asked for
    assert all(torch.equal(b3[k], b3_again[k]) for k in b3)
    assert not torch.equal(b3["noise"], b4["noise"])
    grid = training_grid(1000, 20)
    assert torch.isin(b3["t_start"], grid).all()
    assert torch.equal(b3["t_end"], (b3["t_start"] - 20).clamp(min=0))
    assert ((b3["omega"] >= 2) & (b3["omega"] <= 14)).all()


def test_training_grid_and_bad_skip():
    assert training_grid(1000, 20).tolist()[:3] == [19, 39, 59] and len(training_grid(1000, 20)) == 50
    assert training_grid(1000, 30)[-1] == 989
    with pytest.raises(ValueError, match="nearest valid"):
        training_grid(1000, 70)


@pytest.mark.parametrize("solver, calls", [("ddim", 1), ("dpm-solver", 2), ("dpm-solver++", 2)])
def test_teacher_cond_and_uncond_run_as_one_batched_forward(bundle, data, solver, calls):
    task = _task(bundle, data, solver=solver)
    seen, handle = _count_calls(task.teacher.unet)
    try:
        task.loss(task.batch(0), 0)
    finally:
        handle.remove()
    assert seen == [4] * calls  # B = 2: [cond; uncond] in one forward per solver stage


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_batched_augmented_step_equals_two_branch_form(bundle, data, solver):
    task = _task(bundle, data, solver=solver)
    b = task.batch(1)
    z = torch.randn_like(b["z0"])
    uncond = data.uncond_states.expand_as(b["text"])
    with torch.no_grad():
        ours = task.solver_target(z, b["t_start"], b["t_end"], b["text"], b["omega"])
        ref = augmented_step(SOLVERS[solver], z, b["t_start"], b["t_end"], lambda x, t: task.teacher(x, t, b["text"]),
                             lambda x, t: task.teacher(x, t, uncond), b["omega"], alpha_bar=task.alpha_bar)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ddim_target_equals_the_diffusers_script_form(bundle, data):
    """CFG on x0 and eps, then one DDIM step to t_n (diffusers' train_lcm_distill_sd_wds.py)."""
    from diffusers import DDIMScheduler

    task = _task(bundle, data, solver="ddim", batch_size=4)
    b = task.batch(5)
    ab = DDIMScheduler.from_config(bundle.scheduler_config).alphas_cumprod.double()  # [T]
    a_s = ab[b["t_start"]].view(-1, 1, 1, 1)
    z_s = (a_s.sqrt() * b["z0"] + (1 - a_s).sqrt() * b["noise"]).float()
    w = b["omega"].view(-1, 1, 1, 1)
    with torch.no_grad():
        ours = task.solver_target(z_s, b["t_start"], b["t_end"], b["text"], b["omega"])
        eps_c = bundle.unet(z_s, b["t_start"], b["text"]).sample
        eps_u = bundle.unet(z_s, b["t_start"], data.uncond_states.expand_as(b["text"])).sample
    x0_c, x0_u = [(z_s - (1 - a_s).sqrt() * e) / a_s.sqrt() for e in (eps_c, eps_u)]
    x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    a_prev = torch.stack([ab[t - 20] if t >= 20 else ab[0] for t in b["t_start"].tolist()]).view(-1, 1, 1, 1)
    ref = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_loss_is_finite_and_gradients_reach_only_the_student(bundle, data):
    for kind in ("l2", "huber"):
        task = _task(bundle, data, loss=kind)
        loss, _ = task.loss(task.batch(0), 0)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        assert all(p.grad is not None for p in task.student_unet.parameters())
        assert task.student_unet.time_embedding.cond_proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in task.teacher.parameters())
        assert all(p.grad is None for p in task.target_unet.parameters())
    x, y = torch.zeros(3), torch.tensor([0.0, 1.0, -2.0])
    assert distance(x, y, "l2") == pytest.approx(5 / 3)
    assert distance(x, y, "huber", 0.001) == pytest.approx(((1 + 1e-6) ** 0.5 + (4 + 1e-6) ** 0.5 - 0.002) / 3)


def test_gradient_checkpointing_gives_the_same_gradients(bundle, data):
    grads = []
    for flag in (False, True):
        task = _task(bundle, data, gradient_checkpointing=flag)
        assert task.student_unet.is_gradient_checkpointing == flag
        loss, _ = task.loss(task.batch(0), 0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.student_unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_ema_target_moves_toward_the_student(bundle, data):
    task = _task(bundle, data, ema_decay=0.9)
    before = [p.detach().clone() for p in task.target_unet.parameters()]
    with torch.no_grad():
        for p in task.student_unet.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def gap():
        return sum(float((t - s).detach().pow(2).sum()) for t, s in zip(task.target_unet.parameters(),
                                                                task.student_unet.parameters()))
    gap_before = gap()
    task.after_update(0)
    assert gap() == pytest.approx(0.81 * gap_before, rel=1e-4)  # (mu)^2 of the squared gap
    for t, old, s in zip(task.target_unet.parameters(), before, task.student_unet.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)


def test_student_ema_averages_the_student_with_warm_up_and_is_what_ships(bundle, data):
    task = _task(bundle, data, student_ema=0.999)
    assert set(task.modules()) == {"student", "target", "student_ema"} and task.export_unet is task.average_unet
    before = [p.detach().clone() for p in task.average_unet.parameters()]
    with torch.no_grad():
        for p in task.student_unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    task.after_update(0)  # warm-up: decay min(0.999, 1 / 10) = 0.1
    for a, old, s in zip(task.average_unet.parameters(), before, task.student_unet.parameters()):
        torch.testing.assert_close(a, 0.1 * old + 0.9 * s)
    assert not any(p.requires_grad for p in task.average_unet.parameters())
    plain = _task(bundle, data)
    assert plain.average_unet is None and plain.export_unet is plain.student_unet
    assert "student_ema" not in plain.modules()
    with pytest.raises(ValueError, match="student_ema"):
        LCDConfig(student_ema=1.0)


def test_distill_cli_student_ema_exports_the_average_and_rejects_lora(micro_teacher, tmp_path, capsys):
    from latentcm.training.checkpoint import read_checkpoint

    out = tmp_path / "lcm"
    args = ["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
            "--num-data", "4", "--validate-every", "0", "--lr", "1e-2", "--student-ema", "0.999"]
    main(args)
    tensors, _ = read_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    shipped = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    key = next(k for k in shipped if k.endswith("conv_in.weight"))
    avg, online = tensors[f"module.student_ema.{key}"], tensors[f"module.student.{key}"]
    assert not torch.equal(avg, online)  # two steps at a high lr: the average lags the online weights
    torch.testing.assert_close(shipped[key].float(), avg.float(), atol=1e-3, rtol=1e-3)  # what ships is the average
    script = Path(__file__).resolve().parents[1] / "scripts" / "checkpoint_to_lcm.py"
    online = tmp_path / "online"
    subprocess.run([sys.executable, str(script), "--run", str(out), "--checkpoint", "step-0000002.safetensors",
                    "--teacher", str(micro_teacher), "--out", str(online), "--which", "student"], check=True,
                   capture_output=True)
    exported = load_file(str(online / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(exported[key].float(), tensors[f"module.student.{key}"].float())
    card = (online / "README.md").read_text()
    assert "lcm distill --teacher" in card and "--student-ema 0.999" in card and "--which student" in card
    with pytest.raises(SystemExit) as exc:
        main(args[:3] + ["--out", str(tmp_path / "lora"), "--lora", "4", "--student-ema", "0.99"])
    assert exc.value.code != 0 and "--student-ema" in capsys.readouterr().err


def test_distill_cli_writes_a_folder_diffusers_loads_and_samples_like_ours(micro_teacher, tmp_path, capsys):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "lcm"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
          "--num-data", "4", "--validate-every", "0", "--lr", "1e-3", "--loss", "huber"])
    assert capsys.readouterr().out.strip().endswith(str(out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"][1] == "LCMScheduler"
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["original_inference_steps"] == 50 and sched["timestep_scaling"] == 10.0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "lcm distill --teacher" in card and "--loss huber" in card
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 256 and pipe.safety_checker is None
    prompt = "a red circle on a blue background"
    states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]  # [1, L, D]
    for steps in (1, 4):
        g = torch.Generator().manual_seed(5)
        latents = torch.randn((1, 4, 16, 16), generator=g)  # draw 0; the pipeline's step noises are draws 1, 2, ...
        ref = pipe(prompt, num_inference_steps=steps, guidance_scale=8.5, latents=latents, generator=g,
                   output_type="latent").images
        ours = sample_student(pipe.unet, dict(pipe.scheduler.config), states, [5], (4, 16, 16), steps=steps,
                              omega=7.5, original_inference_steps=50)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("args, needle", [
    (["--omega-min", "5", "--omega-max", "2"], "omega_min <= omega_max"),
    (["--skip", "70"], "nearest valid"),
    (["--solver", "euler"], "--solver"),
])
def test_distill_bad_input_is_one_line_and_exit_2(micro_teacher, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and needle in err


def test_two_step_resume_equals_an_uninterrupted_run(bundle, data, tmp_path):
    cfg = LoopConfig(max_steps=2, lr=1e-3, warmup=0, schedule="constant", checkpoint_every=1)
    full = _task(bundle, data, ema_decay=0.5)
    assert fit(full, cfg, tmp_path / "a") == 2
    assert fit(_task(bundle, data, ema_decay=0.5), LoopConfig(**{**cfg.__dict__, "max_minutes": 1e-9}),
               tmp_path / "b") == 1
    resumed = _task(bundle, data, ema_decay=0.5)
    assert fit(resumed, cfg, tmp_path / "b", resume=True) == 2
    for name in ("student_unet", "target_unet"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    last_a = load_file(str(list_checkpoints(tmp_path / "a" / "checkpoints")[-1]))
    last_b = load_file(str(list_checkpoints(tmp_path / "b" / "checkpoints")[-1]))
    assert last_a.keys() == last_b.keys() and any(k.startswith("optim.") for k in last_a)
    assert any(k.startswith("module.target.") for k in last_a)
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    assert not torch.equal(full.student_unet.time_embedding.cond_proj.weight,
                           torch.zeros_like(full.student_unet.time_embedding.cond_proj.weight))


def test_two_process_accelerate_run_keeps_identical_weights(two_process_runs):
    """`accelerate launch` with 2 CPU processes (gloo): data parallel, identical student and target afterwards
    (the "lcd" job of tests/multiprocess_jobs.py)."""
    proc, root = two_process_runs
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = root / "lcd"
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["done"] == 3 for r in ranks)
    assert ranks[0]["student"] == ranks[1]["student"] and ranks[0]["target"] == ranks[1]["target"]
    assert (out / "metrics.csv").read_text().count("\n") == 4  # written by the main process only
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002.safetensors",
                                                                        "step-0000003.safetensors"]


def test_cond_proj_lr_scale_moves_only_the_w_projection_faster(bundle, data):
    from latentcm.training.loop import make_optimizer, train_step

    cfg = LoopConfig(max_steps=4, lr=1e-3, warmup=0, schedule="constant", grad_clip=1e9)
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        task = _task(bundle, data, cond_proj_lr_scale=scale, cond_proj_init="default")
        before = {k: v.detach().clone() for k, v in task.student_unet.named_parameters()}
        opt = make_optimizer(task, cfg)
        assert [g.get("lr_scale", 1.0) for g in opt.param_groups] == ([1.0] if scale == 1.0 else [1.0, scale])
        metrics = train_step(task, opt, cfg, step=1)
        assert metrics["lr"] == pytest.approx(1e-3)
        assert opt.param_groups[-1]["lr"] == pytest.approx(1e-3 * scale)
        moved[scale] = {k: v.detach() - before[k] for k, v in task.student_unet.named_parameters()}
    proj = moved[10.0][COND_PROJ_KEY]
    assert proj.abs().max() > 0
    # Adam's first step is lr * g / (|g| + eps): ten times the lr, ten times the step, the gradient being the same
    torch.testing.assert_close(proj, 10 * moved[1.0][COND_PROJ_KEY], rtol=1e-3, atol=1e-9)
    key = next(k for k in moved[1.0] if k.endswith("conv_in.weight"))
    torch.testing.assert_close(moved[10.0][key], moved[1.0][key])  # every other weight as before
    with pytest.raises(ValueError, match="cond_proj_lr_scale"):
        LCDConfig(cond_proj_lr_scale=0.0)


def test_distill_cli_rejects_cond_proj_lr_scale_with_lora(micro_teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "lora"), "--lora", "4",
              "--cond-proj-lr-scale", "10"])
    assert exc.value.code != 0 and "--cond-proj-lr-scale" in capsys.readouterr().err


def test_init_student_continues_from_an_lcm(micro_teacher, micro_lcm, tmp_path, capsys):
    from latentcm.errors import ModelError
    from latentcm.models.denoiser import load_student

    teacher = Bundle.load(micro_teacher).unet
    lcm = Bundle.load(micro_lcm).unet
    student = load_student(micro_lcm, teacher, lcm.config.time_cond_proj_dim)
    assert student.dtype == teacher.dtype and student.training
    lcm_sd = lcm.state_dict()
    assert all(torch.equal(v, lcm_sd[k].to(v.dtype)) for k, v in student.state_dict().items())
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) > 0  # the LCM's, not a zero init
    with pytest.raises(ModelError, match="does not fit"):
        load_student(micro_lcm, teacher, 2 * lcm.config.time_cond_proj_dim)
    with pytest.raises(ModelError, match="no .safetensors"):
        load_student(tmp_path, teacher)

    out = tmp_path / "more"
    main(["distill", "--teacher", str(micro_teacher), "--init-student", str(micro_lcm), "--out", str(out),
          "--max-steps", "1", "--batch-size", "2", "--num-data", "4", "--validate-every", "0"])
    assert (out / "unet").is_dir() and "--init-student" in (out / "README.md").read_text()  # the card's command
    capsys.readouterr()
    for args in (["--init-student", str(tmp_path / "none")], ["--init-student", str(micro_lcm), "--lora", "4"]):
        with pytest.raises(SystemExit) as exc:
            main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err
        assert exc.value.code != 0 and err.count("\n") == 1 and "error" in err and "Traceback" not in err
        assert not (tmp_path / "bad").exists()
