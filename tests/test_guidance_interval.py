"""Guidance in a limited interval (Kynkaanniemi et al. 2024): the w mask, the LCD target that uses it, the
teacher samplers under it (against a hand-written loop over diffusers' DDIMScheduler), and the evaluation
rows, tables and CLI options that carry it."""
import json

import pytest
import torch

from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.evaluation import pipeline, references, reports
from latentcm.evaluation import results as results_file
from latentcm.guidance import interval_omega
from latentcm.sampling.teacher import cfg_combine, guidance_at, initial_latents, make_scheduler
from latentcm.training.consistency import LCDConfig, LCDTask


def test_interval_omega_keeps_w_at_and_below_max_t_and_zeroes_it_above():
    w, t = torch.tensor([2.0, 7.5, 3.0, 5.0]), torch.tensor([99, 699, 700, 999])
    assert interval_omega(w, t, 699).tolist() == [2.0, 7.5, 0.0, 0.0]
    assert interval_omega(w, t, None) is w
    assert interval_omega(7.5, 500, 699) == 7.5 and interval_omega(7.5, 999, 699) == 0.0
    assert interval_omega(7.5, torch.tensor([0, 1000]), 999).tolist() == [7.5, 0.0]  # a number, per-sample t
    assert guidance_at(8.5, 699, 699) == 8.5 and guidance_at(8.5, 700, 699) == 1.0 and guidance_at(8.5, 999, None) == 8.5


@pytest.fixture(scope="module")
def bundle(micro_teacher):
    return Bundle.load(micro_teacher)


def _task(bundle, data, **kw):
    return LCDTask(bundle.unet, bundle.scheduler_config, data, LCDConfig(**{"batch_size": 8, "skip": 100, **kw}))


def test_lcd_target_is_guided_only_where_t_start_is_inside_the_interval(bundle, micro_data, monkeypatch):
    task = _task(bundle, micro_data, guidance_max_t=499)
    batch = task.batch(0)
    assert (batch["t_start"] <= 499).any() and (batch["t_start"] > 499).any()  # both sides in one batch
    seen, real = {}, task.solver_target

    def spy(z_s, t_start, t_end, text, omega):
        seen["omega"] = omega
        return real(z_s, t_start, t_end, text, omega)
    monkeypatch.setattr(task, "solver_target", spy)
    with torch.no_grad():
        task.loss(batch, 0)
    want = torch.where(batch["t_start"] <= 499, batch["omega"], torch.zeros_like(batch["omega"]))
    assert torch.equal(seen["omega"], want)
    # w = 0 is the conditional ODE step alone: the target ignores the empty prompt's prediction
    z = torch.randn_like(batch["z0"])
    with torch.no_grad():
        zero = task.solver_target(z, batch["t_start"], batch["t_end"], batch["text"], torch.zeros(8))
        saved = micro_data.uncond_states.clone()  # the fixture is shared: restore it exactly
        micro_data.uncond_states.add_(1.0)
        try:
            zero_other_uncond = task.solver_target(z, batch["t_start"], batch["t_end"], batch["text"], torch.zeros(8))
        finally:
            micro_data.uncond_states.copy_(saved)
    torch.testing.assert_close(zero, zero_other_uncond)


def test_an_interval_covering_every_t_changes_nothing(bundle, micro_data):
    batch = _task(bundle, micro_data).batch(3)
    with torch.no_grad():
        full = _task(bundle, micro_data).loss(batch, 3)[0]
        covering = _task(bundle, micro_data, guidance_max_t=999).loss(batch, 3)[0]
    assert torch.equal(full, covering)
    with pytest.raises(ValueError, match="guidance_max_t"):
        LCDConfig(guidance_max_t=-1)


def _hand_loop(bundle, prompts, seeds, sampler, steps, guidance, max_t):
    """CFG sampling written out over diffusers' scheduler: g at t <= max_t, the conditional model above."""
    sched = make_scheduler(sampler, bundle.scheduler_config)
    sched.set_timesteps(steps)
    z = initial_latents(seeds, bundle.latent_shape(32, 32))
    cond, uncond = bundle.encode_prompts(prompts), bundle.encode_uncond(len(prompts))
    with torch.no_grad():
        for t in sched.timesteps:
            eps_c = bundle.unet(z, t, encoder_hidden_states=cond).sample
            eps_u = bundle.unet(z, t, encoder_hidden_states=uncond).sample
            eps = cfg_combine(eps_u, eps_c, guidance) if int(t) <= max_t else eps_c
            z = sched.step(eps, t, z).prev_sample
    return z


@pytest.mark.parametrize("sampler", ["ddim-trailing", "dpm-solver++"])
def test_teacher_sampler_under_an_interval_equals_the_hand_written_loop(bundle, sampler):
    prompts, seeds = ["a red circle", "a blue star"], [0, 1]
    kw = dict(sampler=sampler, steps=4, guidance=6.0, height=32, width=32)
    ours = bundle.sample_latents(prompts, seeds, guidance_max_t=499, **kw)
    torch.testing.assert_close(ours, _hand_loop(bundle, prompts, seeds, sampler, 4, 6.0, 499), rtol=1e-4, atol=1e-4)
    full = bundle.sample_latents(prompts, seeds, **kw)
    assert torch.equal(bundle.sample_latents(prompts, seeds, guidance_max_t=999, **kw), full)
    unguided = bundle.sample_latents(prompts, seeds, **{**kw, "guidance": 1.0})
    torch.testing.assert_close(bundle.sample_latents(prompts, seeds, guidance_max_t=0, **kw), unguided,
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, full) and not torch.allclose(ours, unguided)


def test_rows_tables_and_ceilings_keep_interval_rows_apart():
    row = pipeline.Row("teacher", "ddim", 4, 8.5, 699)
    assert row.key == "teacher-ddim-4-g8.5-gmax699" and pipeline.Row("teacher", "ddim", 4, 8.5).key == "teacher-ddim-4-g8.5"
    rows = pipeline.table_rows(["lcm", "ddim"], [1, 2], 8.5, guidance_max_t=699)
    assert [(r.sampler, r.steps, r.guidance_max_t) for r in rows] == [
        ("lcm", 1, None), ("lcm", 2, None), ("ddim", 1, None), ("ddim", 2, None), ("ddim", 1, 699), ("ddim", 2, 699)]

    def rec(sampler, steps, kid, **extra):
        return {"sampler": sampler, "steps": steps, "guidance": 8.5, "kid": kid, "kid_std": 1.0, "fid": 10.0 * kid,
                "caption_score": 80.0, "exact_match": 0.5, **extra}
    records = [rec("ddim", 4, 40.0), rec("ddim", 4, 20.0, guidance_max_t=699), rec("lcm", 4, 10.0)]
    table = reports.table1_markdown(records, ceiling=[rec("ddim-trailing", 50, 120.0),
                                                       rec("ddim-trailing", 50, 30.0, guidance_max_t=699)])
    assert "| DDIM, g 8.5 | 400.00 | 40.00 (subset sd 1.00) |" in table
    assert "| DDIM, g 8.5, guided t ≤ 699 | 200.00 | 20.00 (subset sd 1.00) |" in table
    assert "*ceiling: DDIM trailing, 50 steps, g 8.5, guided t ≤ 699*" in table
    best = reports.best_guidance_markdown(records)
    assert "| DDIM (g 8.5) | 40.00" in best and "| DDIM (g 8.5; guided t ≤ 699) | 20.00" in best
    results = {"ceiling": records[0], "ceilings": [records[1]]}
    assert reports.ceilings(results) == records[:2] and reports.ceilings({}) == []


def test_evaluate_scores_interval_rows_and_both_ceilings(micro_lcm, micro_teacher, micro_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "eval"
    main(["evaluate", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
          "--samplers", "lcm,ddim-trailing", "--steps", "1", "--num-samples", "4", "--batch-size", "4",
          "--guidance", "4", "--ceiling", "--guidance-max-t", "499", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    results_file.validate_results(results)
    assert [(r["sampler"], r.get("guidance_max_t")) for r in results["records"]] == [
        ("lcm", None), ("ddim-trailing", None), ("ddim-trailing", 499)]
    assert "guidance_max_t" not in results["ceiling"] and results["ceilings"][0]["guidance_max_t"] == 499
    assert results["ceilings"][0]["fid"] != results["ceiling"]["fid"]
    assert (out / "grids" / "teacher-ddim-trailing-50-g4-gmax499.png").is_file()
    table = (out / "table1.md").read_text()
    assert "| DDIM trailing, g 4, guided t ≤ 499 |" in table and "guided t ≤ 499*" in table


@pytest.mark.parametrize("args, needle", [
    (["generate", "a red circle", "--guidance-max-t", "500"], "for teacher samplers"),
    (["evaluate", "--preset", "lcm", "--guidance-max-t", "500"], "table1 preset"),
    (["distill", "--guidance-max-t", "-3", "--out", "x"], "-3"),
])
def test_guidance_interval_bad_input_is_one_line_and_exit_2(micro_lcm, args, needle, capsys):
    args = [*args, "--model", str(micro_lcm)] if args[0] == "generate" else args
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


def test_distill_cli_records_the_interval_in_the_card(micro_teacher, tmp_path, capsys):
    out = tmp_path / "lcm"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
          "--num-data", "2", "--validate-every", "0", "--guidance-max-t", "499", "--cond-proj-inputs", "smooth",
          "--omega-min", "1", "--omega-max", "8"])
    card = (out / "README.md").read_text()
    assert "--guidance-max-t 499" in card and "| teacher guided at | t_{n+k} <= 499 only" in card
    assert "| w-embedding entries the w projection reads | the ones smooth over the w range" in card
    main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "full"), "--max-steps", "1",
          "--batch-size", "2", "--num-data", "2", "--validate-every", "0"])
    full = (tmp_path / "full" / "README.md").read_text()
    assert "| teacher guided at | every t (LCM Eq. 6) |" in full and "| w-embedding entries the w projection reads | all |" in full


def test_smooth_embedding_mask_keeps_the_frequencies_that_turn_by_at_most_pi():
    import math

    from latentcm.guidance import guidance_scale_embedding, smooth_embedding_mask

    keep = smooth_embedding_mask(256, 1.0, 8.0)
    assert keep.shape == (256,) and torch.equal(keep[:128], keep[128:]) and int(keep[:128].sum()) == 21
    assert not keep[:107].any() and keep[107:128].all()  # the lowest frequencies, j >= 107 of 128
    w = torch.linspace(1.0, 8.0, 701)
    emb = guidance_scale_embedding(w, 256)  # [701, 256]
    rate = (emb[1:] - emb[:-1]).abs().amax(dim=0) / 0.01  # steepest change per unit w [256]
    assert rate[keep].max() <= 1000 * math.exp(-math.log(10000) * 107 / 127) * 1.01  # kept: slow, phase <= pi
    assert rate[~keep].min() > rate[keep].max()  # dropped: faster than every kept one
    assert int(smooth_embedding_mask(257, 1.0, 8.0).sum()) == 42 and not smooth_embedding_mask(257, 1.0, 8.0)[-1]
    assert int(smooth_embedding_mask(256, 1.0, 4.0)[:128].sum()) > 21  # a narrower range keeps more


def test_restricted_w_projection_trains_only_its_smooth_columns(bundle, micro_data):
    from latentcm.guidance import smooth_embedding_mask

    task = _task(bundle, micro_data, cond_proj_inputs="smooth", cond_proj_init="default", omega_min=1.0, omega_max=8.0)
    proj = task.student_unet.time_embedding.cond_proj
    keep = smooth_embedding_mask(256, 1.0, 8.0)
    assert proj.weight[:, ~keep].abs().max() == 0 and proj.weight[:, keep].abs().max() > 0
    before = proj.weight.detach().clone()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    for step in range(2):
        loss, _ = task.loss(task.batch(step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert proj.weight[:, ~keep].abs().max() == 0 and not torch.equal(proj.weight[:, keep], before[:, keep])
    assert task.target_unet.time_embedding.cond_proj.weight[:, ~keep].abs().max() == 0
    with pytest.raises(ValueError, match="cond_proj_inputs"):
        LCDConfig(cond_proj_inputs="some")


def test_lcm_explicit_timesteps_match_diffusers_pipeline(micro_lcm):
    """Bundle.generate(timesteps=...) is the LCM sampler on that schedule, as diffusers' pipeline(timesteps=...)."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(micro_lcm, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    lcm = Bundle.load(micro_lcm)
    schedule = [999, 499, 299, 99]
    g = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 16, 16), generator=g)  # draw 0 of seed 3's stream; the step noises follow
    ref = pipe("a red circle", timesteps=schedule, guidance_scale=8.5, latents=latents, generator=g,
               output_type="latent").images
    ours = lcm.sample_latents(["a red circle"], [3], "lcm", None, 8.5, timesteps=schedule)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert not torch.allclose(ours, lcm.sample_latents(["a red circle"], [3], "lcm", 4, 8.5))  # not the default grid
    with pytest.raises(Exception, match="steps=2 but 4 timesteps"):
        lcm.sample_latents(["a red circle"], [3], "lcm", 2, 8.5, timesteps=schedule)


@pytest.mark.parametrize("args, needle", [
    (["--timesteps", "499,999"], "strictly descending"),
    (["--timesteps", "999,x"], "comma-separated integers"),
])
def test_timesteps_bad_input_is_one_line_and_exit_2(micro_lcm, tmp_path, args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a red circle", "--model", str(micro_lcm), "--out", str(tmp_path / "x.png"), *args])
    assert exc.value.code == 2 and needle in capsys.readouterr().err.strip().splitlines()[-1]
