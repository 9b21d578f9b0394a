"""Guidance distillation (Meng et al. 2023 stage 1) and the one-pass guided teacher in LCD, on micro models."""
import json
import types

import pytest
import torch

from latentcm import schedules
from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.solvers import SOLVERS, augmented_step
from latentcm.training import consistency
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.guided import GuidanceTask, w_following, w_following_probe
from latentcm.training.loop import LoopConfig, fit


@pytest.fixture(scope="module")
def bundle(micro_teacher):
    return Bundle.load(micro_teacher)


class CFGNet(torch.nn.Module):
    """A 'student' that IS the teacher's CFG combination eps_c + w (eps_c - eps_0) at a fixed w (it ignores the w
    embedding): the case where guidance distillation has nothing left to learn."""

    def __init__(self, teacher, uncond, omega: float):
        super().__init__()
        self.teacher, self.uncond, self.omega = teacher, uncond, omega
        self.config = types.SimpleNamespace(**{**dict(teacher.config), "time_cond_proj_dim": 256})
        self.config.get = lambda key, default=None: getattr(self.config, key, default)

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, **_):
        eps_c = self.teacher(sample, timestep, encoder_hidden_states).sample
        eps_0 = self.teacher(sample, timestep, self.uncond.expand_as(encoder_hidden_states)).sample
        return types.SimpleNamespace(sample=eps_c + self.omega * (eps_c - eps_0))


def _cfg(**kw):
    return LCDConfig(**{"batch_size": 3, "omega_min": 0.0, "omega_max": 11.0, **kw})


def test_batches_draw_every_t_and_w_from_zero(bundle, micro_data):
    task = GuidanceTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(batch_size=64))
    b, again = task.batch(2), GuidanceTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(batch_size=64)).batch(2)
    assert b.keys() == {"z0", "text", "noise", "t", "omega"}
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert b["t"].min() >= 0 and b["t"].max() <= 999 and len(b["t"].unique()) > 40  # t ~ U{0..T-1}, not a grid
    assert b["omega"].min() >= 0 and b["omega"].max() <= 11


def test_loss_is_zero_for_a_student_equal_to_the_cfg_output(bundle, micro_data):
    """Hand-computed cases: the CFG combination itself has loss 0, and the zero-initialised student (= the
    conditional teacher at every w) has loss mean((w (eps_c - eps_0))^2)."""
    cfg = _cfg(omega_min=3.0, omega_max=3.0)
    exact = GuidanceTask(bundle.unet, bundle.scheduler_config, micro_data, cfg,
                         student=CFGNet(bundle.unet, micro_data.uncond_states, 3.0))
    with torch.no_grad():
        loss, _ = exact.loss(exact.batch(0), 0)
    assert float(loss) < 1e-10

    task = GuidanceTask(bundle.unet, bundle.scheduler_config, micro_data, cfg)
    b = task.batch(0)
    with torch.no_grad():
        loss, _ = task.loss(b, 0)
        z_t = (task.alpha_bar[b["t"]].sqrt().view(-1, 1, 1, 1) * b["z0"]
               + (1 - task.alpha_bar[b["t"]]).sqrt().view(-1, 1, 1, 1) * b["noise"]).float()
        eps_c = bundle.unet(z_t, b["t"], b["text"]).sample
        eps_0 = bundle.unet(z_t, b["t"], micro_data.uncond_states.expand_as(b["text"])).sample
    torch.testing.assert_close(loss, torch.mean((3.0 * (eps_c - eps_0)) ** 2), rtol=1e-4, atol=1e-8)
    loss_l2 = task.loss(b, 0)[0]
    loss_l2.backward()
    assert task.student_unet.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # the w pathway learns
    assert all(p.grad is None for p in task.teacher.parameters())


def test_training_makes_the_student_follow_w(bundle, micro_data, tmp_path):
    task = GuidanceTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(batch_size=4),
                        preview_fn=None)
    task.preview_fn = w_following_probe(task.teacher, bundle.scheduler_config, micro_data)
    before = w_following(task.teacher, task.student, micro_data, num=4)
    assert all(r["norm_ratio"] == 0 for r in before)  # zero-init w projection: no w response yet
    fit(task, LoopConfig(max_steps=12, lr=2e-3, warmup=0, preview_every=12, checkpoint_every=100), tmp_path)
    after = w_following(task.teacher, task.student, micro_data, num=4)
    assert sum(r["norm_ratio"] for r in after) > 0.01 and sum(r["cosine"] for r in after) > 0
    log = [json.loads(line) for line in (tmp_path / "previews" / "w-following.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and [r["t"] for r in log[-1]["per_t"]] == [99, 299, 499, 699, 899]


@pytest.mark.parametrize("solver, calls", [("ddim", 1), ("dpm-solver", 2)])
def test_one_pass_guided_teacher_runs_one_forward_of_batch_b(bundle, micro_data, solver, calls):
    guided = CFGNet(bundle.unet, micro_data.uncond_states, 2.0)
    task = LCDTask(bundle.unet, bundle.scheduler_config, micro_data,
                   LCDConfig(batch_size=2, solver=solver, omega_min=2.0, omega_max=2.0), guided_teacher=guided)
    seen = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[0]), with_kwargs=True)
    try:
        task.solver_target(torch.randn(2, 4, 16, 16), torch.tensor([499, 899]), torch.tensor([399, 799]),
                           micro_data.text_states[:2], torch.tensor([2.0, 2.0]))
    finally:
        handle.remove()
    assert len(seen) == 2 * calls and set(seen) == {2}  # CFGNet itself runs cond and uncond: 2 calls per stage


def test_one_pass_target_equals_the_two_pass_target_for_an_exact_guided_teacher(bundle, micro_data):
    """DDIM is affine in the prediction, so an exact CFG network gives LCD's two-pass target (Algorithm 1 line 5)."""
    cfg = LCDConfig(batch_size=2, solver="ddim", omega_min=2.0, omega_max=2.0)
    two = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, cfg)
    one = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, cfg,
                  guided_teacher=CFGNet(bundle.unet, micro_data.uncond_states, 2.0))
    b = two.batch(1)
    z = torch.randn_like(b["z0"])
    with torch.no_grad():
        ours = one.solver_target(z, b["t_start"], b["t_end"], b["text"], b["omega"])
        ref = augmented_step(SOLVERS["ddim"], z, b["t_start"], b["t_end"], lambda x, t: two.teacher(x, t, b["text"]),
                             lambda x, t: two.teacher(x, t, micro_data.uncond_states.expand_as(b["text"])),
                             b["omega"], alpha_bar=two.alpha_bar)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_cli_guidance_stage_then_lcd_from_it(micro_teacher, tmp_path, capsys):
    guided = tmp_path / "guided"
    main(["distill", "--stage", "guidance", "--teacher", str(micro_teacher), "--out", str(guided), "--max-steps", "2",
          "--batch-size", "2", "--num-data", "4", "--validate-every", "2"])
    cfg = json.loads((guided / "unet" / "config.json").read_text())
    assert cfg["time_cond_proj_dim"] == 256
    assert "Guidance-distilled" in (guided / "README.md").read_text()
    assert (guided / "previews" / "w-following.jsonl").is_file()
    assert not Bundle.load(guided).is_lcm
    lcm = tmp_path / "lcm"
    main(["distill", "--teacher", str(micro_teacher), "--init-student", str(guided), "--guided-teacher", str(guided),
          "--out", str(lcm), "--max-steps", "2", "--batch-size", "2", "--num-data", "4", "--validate-every", "0",
          "--omega-zero-share", "0.25", "--ode-pair-share", "0.5", "--ode-pair-steps", "2",
          "--ode-pair-starts", "top"])
    assert Bundle.load(lcm).is_lcm
    card = (lcm / "README.md").read_text()
    assert "w = 0 for a share of 0.25" in card
    assert "ODE's end point as target (2 solver steps, input always the pure noise)" in card


@pytest.mark.parametrize("args, needle", [
    (["--solver", "dpm-solver"], "--solver is an LCD option"),
    (["--schedule", "refine"], "--schedule is an LCD option"),
    (["--renoise", "keep-means"], "--renoise is an LCD option"),
    (["--lora", "4"], "--lora is an LCD option"),
    (["--noise-start-share", "0.2"], "--noise-start-share is an LCD option"),
    (["--low-w-skip", "20"], "--low-w-skip is an LCD option"),
    (["--ode-pair-share", "0.2"], "--ode-pair-share is an LCD option"),
    (["--ode-pair-starts", "top"], "--ode-pair-starts is an LCD option"),
])
def test_cli_guidance_stage_refuses_lcd_options(micro_teacher, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--stage", "guidance", "--teacher", str(micro_teacher), "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_omega_zero_share_sets_that_share_to_zero_and_a_share_of_zero_keeps_the_stream():
    from latentcm.training.lcd_config import draw_omega

    plain = draw_omega(_cfg(), 4000, torch.Generator().manual_seed(3))
    uniform = 11.0 * torch.rand(4000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, uniform)  # share 0: the old w ~ U[0, 11] draw, no extra random numbers
    mixed = draw_omega(_cfg(omega_zero_share=0.25), 4000, torch.Generator().manual_seed(3))
    zero = mixed == 0
    assert 0.22 < zero.float().mean() < 0.28  # 1000 expected; binomial sd 27
    assert torch.equal(mixed[~zero], uniform[~zero])  # the rest keep their uniform draw
    assert (draw_omega(_cfg(omega_zero_share=1.0), 50, torch.Generator()) == 0).all()
    with pytest.raises(ValueError, match="omega_zero_share"):
        _cfg(omega_zero_share=1.5)
    with pytest.raises(ValueError, match="needs a w range"):
        _cfg(omega_zero_share=0.2, omega_max=0.0)


def test_lcd_batches_take_the_zero_share(bundle, micro_data):
    task = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(batch_size=64, omega_zero_share=0.5))
    omega = task.batch(1)["omega"]
    assert 16 < int((omega == 0).sum()) < 48 and omega.max() <= 11


def test_low_w_skip_puts_the_low_w_samples_on_their_own_grid_and_off_keeps_the_stream(bundle, micro_data):
    plain = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(batch_size=64, skip=100,
                                                                           omega_zero_share=0.5)).batch(1)
    task = LCDTask(bundle.unet, bundle.scheduler_config, micro_data,
                   _cfg(batch_size=64, skip=100, omega_zero_share=0.5, low_w_skip=20, low_w_max=1.0))
    batch = task.batch(1)
    for key in ("z0", "noise", "omega", "text"):  # the k draw comes last: everything else as without it
        assert torch.equal(batch[key], plain[key])
    low = batch["omega"] <= 1.0
    assert 16 < int(low.sum()) < 56 and not low.all()
    t, gap = batch["t_start"], batch["t_start"] - batch["t_end"]
    assert ((t[low] + 1) % 20 == 0).all() and (gap[low] == torch.clamp(t[low], max=20)).all()
    assert torch.equal(t[~low], plain["t_start"][~low]) and (gap[~low] == torch.clamp(t[~low], max=100)).all()
    assert ((t[low] + 1) % 100 != 0).any()  # some low-w samples sit between the k = 100 points
    with pytest.raises(ValueError, match="low_w_skip"):
        _cfg(low_w_skip=20, omega_max=0.0)
    from latentcm.export.pipeline import _low_w_text  # what the LCM card says of the recipe's low-w end
    assert _low_w_text({"omega_zero_share": 0.5, "low_w_skip": 20, "low_w_max": 1.0}) == (
        ", and w = 0 for a share of 0.5; k = 20 for the samples with w <= 1")


def test_noise_starts_begin_at_the_top_from_pure_noise_and_off_keeps_the_stream(bundle, micro_data):
    cfg = dict(batch_size=64, skip=100, omega_zero_share=0.5, low_w_skip=20, low_w_max=1.0)
    plain = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(**cfg)).batch(1)
    task = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(**cfg, noise_start_share=0.25))
    batch = task.batch(1)
    for key in ("z0", "noise", "omega", "text"):  # the noise-start draw comes last
        assert torch.equal(batch[key], plain[key])
    pure, low = batch["pure_noise"], batch["omega"] <= 1.0
    assert 4 < int(pure.sum()) < 32
    assert (batch["t_start"][pure] == 999).all() and torch.equal(batch["t_start"][~pure], plain["t_start"][~pure])
    gap = batch["t_start"] - batch["t_end"]
    assert (gap[pure & low] == 20).all() and (gap[pure & ~low] == 100).all()  # each sample keeps its own k
    seen = _record_inputs(task)
    with torch.no_grad():
        task.loss(batch, 1)
    assert torch.equal(seen["z"][pure], batch["noise"][pure])  # the sampler's own start, no data in it
    assert not torch.equal(seen["z"][~pure], batch["noise"][~pure])
    with pytest.raises(ValueError, match="noise_start_share"):
        _cfg(noise_start_share=0.5, target="same-noise")
    from latentcm.export.pipeline import _low_w_text
    assert _low_w_text({"noise_start_share": 0.25}) == (
        "; a share of 0.25 starting at the grid's top point from pure noise")


def _with_option(bundle, micro_data, step: int, **options):
    """(the batch without the options, the task with them, its batch) at batch size 32, k = 100."""
    cfg = dict(batch_size=32, skip=100)
    plain = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(**cfg)).batch(step)
    task = LCDTask(bundle.unet, bundle.scheduler_config, micro_data, _cfg(**cfg, **options))
    return plain, task, task.batch(step)


def _record_inputs(task) -> dict:
    """Record the student's input z_{t_{n+k}} under "z" on its next forward."""
    seen, fwd = {}, task.student.forward
    task.student.forward = lambda z, t, *a, **k: (seen.setdefault("z", z), fwd(z, t, *a, **k))[1]
    return seen


def test_ode_starts_put_the_input_on_the_teachers_ode_from_pure_noise(bundle, micro_data):
    plain, task, batch = _with_option(bundle, micro_data, 2, noise_start_share=0.2, ode_start_share=0.5,
                                      ode_start_steps=1)
    pure, ode = batch["pure_noise"], batch["ode_start"]
    assert ode.any() and pure.any() and not (pure & ode).any()
    assert torch.equal(batch["t_start"][ode], plain["t_start"][ode]) and (batch["t_start"][ode] < 999).all()
    seen = _record_inputs(task)
    with torch.no_grad():
        task.loss(batch, 2)
        t, text, omega = batch["t_start"][ode], batch["text"][ode], batch["omega"][ode]
        one_step = task.solver_target(batch["noise"][ode], torch.full_like(t, 999), t, text, omega)
    torch.testing.assert_close(seen["z"][ode], one_step)  # one guided teacher step from the top point's noise
    rest = ~(pure | ode)  # the others: data noised to t_{n+k}, as without the option
    noised = schedules.add_noise(batch["z0"], batch["noise"], task.alpha_bar[batch["t_start"]])
    torch.testing.assert_close(seen["z"][rest], noised[rest])
    with pytest.raises(ValueError, match="ode_start_share"):
        _cfg(noise_start_share=0.6, ode_start_share=0.5)


def test_ode_pairs_take_input_and_target_from_one_teacher_trajectory(bundle, micro_data, monkeypatch):
    plain, task, batch = _with_option(bundle, micro_data, 3, noise_start_share=0.2, ode_pair_share=0.5,
                                      ode_pair_steps=4)
    pair, pure = batch["ode_pair"], batch["pure_noise"]
    assert 4 < int(pair.sum()) < 28 and pure.any() and not (pair & pure).any()
    for key in ("z0", "noise", "omega", "text"):  # the pair draws come last
        assert torch.equal(batch[key], plain[key])
    times = [999, 749, 499, 249, 0]  # 4 trailing steps from the top point, then t = 0
    assert set(batch["t_start"][pair].tolist()) <= set(times[:-1]) and len(set(batch["t_start"][pair].tolist())) > 1
    seen = _record_inputs(task)
    monkeypatch.setattr(consistency, "distance", lambda pred, target, *a: seen.setdefault("target", target).sum())
    with torch.no_grad():
        task.loss(batch, 3)
        text, omega, z = batch["text"][pair], batch["omega"][pair], batch["noise"][pair]
        states = [z]
        for s, t in zip(times[:-1], times[1:]):  # the teacher's guided DDIM, by hand
            states.append(task.solver_target(states[-1], torch.full_like(omega, s, dtype=torch.long),
                                             torch.full_like(omega, t, dtype=torch.long), text, omega))
    where = [times.index(t) for t in batch["t_start"][pair].tolist()]
    torch.testing.assert_close(seen["z"][pair], torch.stack([states[j][i] for i, j in enumerate(where)]))
    torch.testing.assert_close(seen["target"][pair], states[-1])  # the trajectory's end point, no EMA network
    pairs_off, target = {**batch, "ode_pair": torch.zeros_like(pair)}, seen.pop("target")
    with torch.no_grad():
        task.loss(pairs_off, 3)
    torch.testing.assert_close(target[~pair], seen["target"][~pair])  # the others keep the EMA network's target
    assert not torch.allclose(target[pair], seen["target"][pair])
    with pytest.raises(ValueError, match="ode_pair_share"):
        _cfg(noise_start_share=0.6, ode_pair_share=0.5)
    with pytest.raises(ValueError, match="ode_pair_share"):
        _cfg(ode_pair_share=0.5, target="same-noise")


def test_ode_pairs_at_the_top_point_map_pure_noise_to_the_odes_end(bundle, micro_data, monkeypatch):
    _, task, batch = _with_option(bundle, micro_data, 3, ode_pair_share=0.5, ode_pair_steps=2, ode_pair_starts="top")
    pair = batch["ode_pair"]
    assert 4 < int(pair.sum()) < 28 and (batch["t_start"][pair] == 999).all()
    seen, sizes, target_fn = _record_inputs(task), [], task.target
    task.target = lambda z, *a: (sizes.append(len(z)), target_fn(z, *a))[1]
    monkeypatch.setattr(consistency, "distance", lambda pred, target, *a: seen.setdefault("target", target).sum())
    with torch.no_grad():
        task.loss(batch, 3)
        text, omega, z = batch["text"][pair], batch["omega"][pair], batch["noise"][pair]
        for s, t in ((999, 499), (499, 0)):  # the teacher's guided DDIM, by hand
            z = task.solver_target(z, torch.full_like(omega, s, dtype=torch.long),
                                   torch.full_like(omega, t, dtype=torch.long), text, omega)
    torch.testing.assert_close(seen["z"][pair], batch["noise"][pair])  # the sampler's start: pure noise
    torch.testing.assert_close(seen["target"][pair], z)
    assert sizes == [int((~pair).sum())]  # no solver step or target pass on the pair samples
    with pytest.raises(ValueError, match="ode_pair_starts"):
        _cfg(ode_pair_share=0.5, ode_pair_starts="middle")
    with pytest.raises(ValueError, match="top needs ode_pair_share"):
        _cfg(ode_pair_starts="top")  # no pairs to place: refused, not ignored


@pytest.mark.parametrize("args, needle", [
    (["--lora", "4", "--omega-zero-share", "0.2"], "--omega-zero-share needs a w input"),
    (["--lora", "4", "--low-w-skip", "20"], "--low-w-skip needs a w input"),
    (["--guidance-mode", "cfg", "--omega-zero-share", "0.2"], "omega_zero_share needs a w range"),
    (["--guidance-mode", "cfg", "--low-w-skip", "20"], "low_w_skip needs"),
    (["--omega-zero-share", "1.5"], "--omega-zero-share"),
    (["--noise-start-share", "-0.1"], "--noise-start-share"),
])
def test_cli_refuses_a_zero_share_without_a_w_input(micro_teacher, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
