"""Stable Diffusion families beyond SD 1.5 (v-prediction, SDXL) distil through the one Denoiser / LCD code path.

(a) v-prediction teachers (SD 2.x 768 style): x0 and eps both derived from v (LCM Sec. 4.1;
   luosiallen/latent-consistency-model#65) -- checked against diffusers, on an analytic teacher and on a micro UNet.
(b) SDXL: two text encoders, pooled text + time_ids as added conditions, zero unconditional embeddings,
    the w embedding on a text_time UNet, distil + export to StableDiffusionXLPipeline + LCMScheduler.
"""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from latentcm import parameterization as P
from latentcm.cli import main
from latentcm.guidance import guidance_scale_embedding
from latentcm.sampling.lcm import lcm_step
from latentcm.models import components as C
from latentcm.models import sdxl
from latentcm.bundle import Bundle
from latentcm.models.denoiser import COND_PROJ_KEY, Denoiser, make_student
from latentcm.sampling.student import sample_student
from latentcm.schedules import alpha_sigma_at, alphas_cumprod_from_config
from latentcm.solvers import SOLVERS, ddim_step
from latentcm.schedules import lcm_scheduler_config
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.data.tensors import LCDData
from latentcm.training.data.shapes import world_data


def _sched(prediction_type: str) -> dict:
    return {**C.noise_scheduler_config(), "prediction_type": prediction_type}


# --- (a) v-prediction ----------------------------------------------------------------------------

class GaussianDataNet(torch.nn.Module):
    """Exact denoiser of data x0 ~ N(mu, s^2 I), with the UNet call signature, answering in ``prediction_type``.

    x0_pred = E[x0 | z_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z_t - alpha mu);
    eps_pred = (z_t - alpha x0) / sigma; v = alpha eps - sigma x0. The prompt is ignored (so CFG is a no-op); ``timestep_cond`` is accepted like an LCM
    student's. ``mu`` and ``log_s`` are parameters, so the same class serves as a trainable analytic student.
    """

    def __init__(self, mu: torch.Tensor, s: float, alpha_bar: torch.Tensor, prediction_type: str,
                 time_cond_proj_dim: int | None = None):
        super().__init__()
        self.mu = torch.nn.Parameter(mu.clone())
        self.log_s = torch.nn.Parameter(torch.tensor(float(s)).log())
        self.alpha_bar, self.prediction_type = alpha_bar, prediction_type
        self.config = {"time_cond_proj_dim": time_cond_proj_dim}

    def forward(self, z, t, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None):
        alpha, sigma = alpha_sigma_at(self.alpha_bar, t.double() if t.is_floating_point() else t)
        a, sg = P.append_dims(alpha, z), P.append_dims(sigma, z)
        x0 = self.x0(z, a, sg)  # [B, C, H, W]
        eps = (z - a * x0) / sg
        return SimpleNamespace(sample=P.output_from_x0_eps(x0, eps, alpha, sigma, self.prediction_type))

    def x0(self, z, a, sg):
        s2 = self.log_s.exp() ** 2
        return self.mu + a * s2 / (a ** 2 * s2 + sg ** 2) * (z - a * self.mu)


class GaussianFlowMapNet(GaussianDataNet):
    """A trainable analytic LCM student: x0 = mu + s (z_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2), the exact
    PF-ODE endpoint (consistency function) of data N(mu, s^2 I). At mu = 0, s = 1 it returns its input noise."""

    def x0(self, z, a, sg):
        s = self.log_s.exp()
        return self.mu + s * (z - a * self.mu) / (a ** 2 * s ** 2 + sg ** 2).sqrt()


SHAPE = (4, 8, 8)


def _mu() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.sign(torch.randn(SHAPE, generator=g))  # a +-1 "image"


def _gaussian_data(n: int = 16, s: float = 0.1) -> LCDData:
    g = torch.Generator().manual_seed(12)
    latents = _mu() + s * torch.randn((n, *SHAPE), generator=g)
    return LCDData(latents, torch.ones(n, 2, 8), torch.zeros(1, 2, 8))


def test_v_conversion_matches_diffusers_ddim_step():
    """x0 = alpha z - sigma v and eps = alpha v + sigma z: diffusers' DDIMScheduler.step(v_prediction) agrees."""
    from diffusers import DDIMScheduler

    cfg = _sched("v_prediction")
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(50)
    ab = alphas_cumprod_from_config(cfg)
    g = torch.Generator().manual_seed(0)
    for t in (981, 501, 21):
        z, v = torch.randn(2, *SHAPE, generator=g), torch.randn(2, *SHAPE, generator=g)
        out = sched.step(v, t, z, eta=0.0)
        alpha, sigma = alpha_sigma_at(ab, torch.tensor([t, t]))
        x0, eps = P.x0_eps_from_output(v, z, alpha, sigma, "v_prediction")
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        ours = ddim_step(z, torch.tensor([t, t]), torch.tensor([t - 20, t - 20]),
                         lambda x, s: P.x0_eps_from_output(v, x, *alpha_sigma_at(ab, s), "v_prediction"), alpha_bar=ab)
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-5, atol=1e-5)
        # the raw-v-as-eps bug (luosiallen#65) is a different step
        buggy = ddim_step(z, t, t - 20, lambda x, s: (x0, v), alpha_bar=ab)
        assert (buggy - out.prev_sample).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_lcm_scheduler_step_agrees_with_ours(prediction_type):
    from diffusers import LCMScheduler

    cfg = lcm_scheduler_config(_sched(prediction_type), skip=20)
    assert cfg["prediction_type"] == prediction_type  # the export carries the teacher's parameterization
    sched = LCMScheduler(**cfg)
    sched.set_timesteps(4)
    ts = [int(t) for t in sched.timesteps]
    ab = alphas_cumprod_from_config(cfg)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, *SHAPE, generator=g)
    for i, t in enumerate(ts):
        out = torch.randn(2, *SHAPE, generator=g)
        gen = torch.Generator().manual_seed(100 + i)
        ref = sched.step(out, t, z, generator=gen)
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(100 + i))
        x_next, denoised = lcm_step(out, t, z, t_next, noise, alpha_bar=ab, prediction_type=prediction_type)
        torch.testing.assert_close(denoised, ref.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_next, ref.prev_sample, rtol=1e-5, atol=1e-5)
        z = ref.prev_sample


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_teachers_give_the_eps_teachers_lcd_targets(solver, prediction_type):
    """One underlying denoiser answering in v (or x0) vs in eps: identical solver targets, student and target
    consistency functions through LCDTask -- i.e. both x0 and eps are derived from the output."""
    ab = alphas_cumprod_from_config(_sched("epsilon"))
    data, cfg = _gaussian_data(), LCDConfig(batch_size=4, solver=solver)

    def task(kind):
        teacher = GaussianDataNet(_mu(), 0.1, ab, kind)
        student = GaussianDataNet(0.5 * _mu(), 0.3, ab, kind, time_cond_proj_dim=256)
        return LCDTask(teacher, _sched(kind), data, cfg, student=student)
    ref, other = task("epsilon"), task(prediction_type)
    b = ref.batch(3)
    z_s = torch.randn_like(b["z0"])
    with torch.no_grad():
        targets = [t.solver_target(z_s, b["t_start"], b["t_end"], b["text"], b["omega"]) for t in (ref, other)]
        torch.testing.assert_close(targets[1], targets[0], rtol=1e-4, atol=1e-4)
        w_emb = ref.w_embedding(b["omega"], z_s.dtype)
        for t in (b["t_start"], b["t_end"]):
            torch.testing.assert_close(other.student(z_s, t, b["text"], w_emb), ref.student(z_s, t, b["text"], w_emb),
                                       rtol=1e-4, atol=1e-4)
    loss_ref, _ = ref.loss(b, 0)
    loss_other, _ = other.loss(b, 0)
    assert loss_other.item() == pytest.approx(loss_ref.item(), rel=1e-3)


def test_v_prediction_teacher_distils_to_images_not_noise():
    """LCD from an analytic v-prediction teacher (exact denoiser of data N(mu, 0.1^2 I)) into an analytic
    v-prediction student (the Gaussian PF-ODE flow map, starting at the N(0, I) one, i.e. returning the noise):
    after LCD the 1- and 4-step samples are the data (mu + 0.1 noise), not noise."""
    ab = alphas_cumprod_from_config(_sched("v_prediction"))
    torch.manual_seed(0)
    teacher = GaussianDataNet(_mu(), 0.1, ab, "v_prediction")
    student = GaussianFlowMapNet(torch.zeros(SHAPE), 1.0, ab, "v_prediction", time_cond_proj_dim=256)
    task = LCDTask(teacher, _sched("v_prediction"), _gaussian_data(), LCDConfig(batch_size=8, ema_decay=0.5),
                   student=student)
    seeds = list(range(8))
    text = torch.ones(8, 2, 8)

    def one_step():
        return sample_student(task.student_unet, _sched("v_prediction"), text, seeds, SHAPE, steps=1)
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    before = one_step()
    assert (before - noise).abs().mean() < 1e-3 and (before - _mu()).abs().mean() > 0.9  # noise at the start
    opt = torch.optim.Adam(task.parameters(), lr=0.05)
    for step in range(600):
        loss, _ = task.loss(task.batch(step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_update(step)
    for steps in (1, 4):
        x = sample_student(task.student_unet, _sched("v_prediction"), text, seeds, SHAPE, steps=steps)
        assert (x - _mu()).abs().mean() < 0.15, steps  # images (|mu| = 1 per pixel, data spread 0.1) ...
        assert (x - noise).abs().mean() > 0.5  # ... not the initial noise
        assert 0.05 < float((x - _mu()).std()) < 0.2  # with the data's spread, not collapsed to the mean
    assert float((task.student_unet.mu.detach() - _mu()).abs().mean()) < 0.02


def test_micro_v_unet_student_one_step_is_the_teachers_x0_not_noise():
    """A UNet2DConditionModel v-teacher; make_student (zero cond_proj => student == teacher) samples in 1 step the
    teacher's own x0 = alpha z - sigma v (diffusers' pred_original_sample), not (z - sigma v) / alpha."""
    from diffusers import DDIMScheduler

    teacher = C.build_unet(C.get_preset("micro"), seed=0).eval()
    student = make_student(teacher).eval()
    cfg = _sched("v_prediction")
    seeds, shape = [0, 1], (4, 16, 16)
    text = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = sample_student(student, cfg, text, seeds, shape, steps=1, omega=7.5)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        v = teacher(z, torch.tensor([999, 999]), text).sample
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(50)
    x0 = sched.step(v, 999, z).pred_original_sample
    c_skip, c_out = P.boundary_scalings(999)
    torch.testing.assert_close(ours, (c_skip * z + c_out * x0).float(), rtol=1e-5, atol=1e-5)
    a = sched.alphas_cumprod[999].sqrt()
    as_eps = (z - (1 - a ** 2).sqrt() * v) / a  # what an eps reading of v would give: ~1/alpha = 15x blow-up
    assert as_eps.abs().mean() > 5 * ours.abs().mean()


@pytest.fixture(scope="module")
def micro_v_teacher(tmp_path_factory):
    """The micro SD folder with a v-prediction scheduler (SD 2.x 768 style)."""
    pipe = C.tiny_sd_pipeline(prediction_type="v_prediction")
    dest = tmp_path_factory.mktemp("micro-v") / "teacher"
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def test_v_prediction_distill_exports_v_lcm_that_diffusers_samples_like_ours(micro_v_teacher, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "lcm-v"
    main(["distill", "--teacher", str(micro_v_teacher), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
          "--num-data", "4", "--validate-every", "0", "--lr", "1e-3"])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["prediction_type"] == "v_prediction"
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    for steps in (1, 2):
        g = torch.Generator().manual_seed(5)
        latents = torch.randn((1, 4, 16, 16), generator=g)
        ref = pipe(prompt, num_inference_steps=steps, guidance_scale=8.5, latents=latents, generator=g,
                   output_type="latent").images
        ours = sample_student(pipe.unet, dict(pipe.scheduler.config), states, [5], (4, 16, 16), steps=steps,
                              omega=7.5)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


# --- (b) SDXL --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny StableDiffusionXLPipeline folder built from configs (two CLIP encoders, text_time UNet)."""
    dest = tmp_path_factory.mktemp("sdxl") / "teacher"
    sdxl.build_tiny_pipeline().save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="module")
def sdxl_bundle(tiny_sdxl):
    return Bundle.load(tiny_sdxl)


def test_sdxl_folder_loads_and_encodes_prompts_the_sdxl_way(tiny_sdxl, sdxl_bundle):
    from diffusers import StableDiffusionXLPipeline

    b = sdxl_bundle
    assert b.is_sdxl and b.force_zeros_for_empty_prompt and not b.is_lcm
    assert sdxl.is_text_time(b.unet.config) and sdxl.pooled_dim(b.unet.config) == 32
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    prompts = ["a red circle on a blue background", "a small green triangle"]
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
        ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    cond, uncond = b.encode_prompts(prompts), b.encode_uncond(2)
    assert cond.shape == (2, 33, 64)  # 32 tokens + the packed row; D = 32 + 32 (both encoders' penultimate states)
    for packed, (e, p) in ((cond, (embeds, pooled)), (uncond, (neg, neg_pooled))):
        states, added = sdxl.unpack_condition(packed, b.unet.config)
        torch.testing.assert_close(states, e, rtol=0, atol=0)
        torch.testing.assert_close(added["text_embeds"], p, rtol=0, atol=0)
        torch.testing.assert_close(added["time_ids"], ids.expand(2, -1), rtol=0, atol=0)
    assert not uncond[:, :-1].any() and not neg.any()  # force_zeros_for_empty_prompt: zeros, not CLIP("")
    no_zeros = dataclasses.replace(b, force_zeros_for_empty_prompt=False)
    torch.testing.assert_close(no_zeros.encode_uncond(2), b.encode_prompts(["", ""]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot pack"):
        sdxl.pack_condition(torch.zeros(1, 2, 8), torch.zeros(1, 4), torch.zeros(1, 6))


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver", "dpm-solver++"])
def test_sdxl_teacher_sampling_matches_diffusers(tiny_sdxl, sdxl_bundle, sampler):
    """CFG sampling of the tiny SDXL teacher: ours (packed conditioning through eps_fn) == StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    from latentcm.sampling.teacher import make_scheduler
    from latentcm.sampling.teacher import initial_latents

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.scheduler = make_scheduler(sampler, sdxl_bundle.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    latents = initial_latents([3], (4, 16, 16))
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="latent").images
    ours = sdxl_bundle.sample_latents([prompt], [3], sampler, 3, 5.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_sdxl_student_carries_and_uses_the_w_embedding(sdxl_bundle):
    b = sdxl_bundle
    student = make_student(b.unet, time_cond_proj_dim=64).eval()
    assert student.config.time_cond_proj_dim == 64 and student.config.addition_embed_type == "text_time"
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    t_sd = b.unet.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in student.state_dict().items() if k != COND_PROJ_KEY)
    seen = []
    handle = student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    f_student = Denoiser(student, b.scheduler_config)
    f_teacher = Denoiser(b.unet, b.scheduler_config)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([259, 759])
    cond = b.encode_prompts(["a red circle", "a blue square"])
    w_lo, w_hi = [guidance_scale_embedding(torch.tensor([w, w]), 64) for w in (2.0, 12.0)]
    with torch.no_grad():
        ref = f_teacher(z, t, cond)[0]
        torch.testing.assert_close(f_student(z, t, cond, w_lo)[0], ref, rtol=0, atol=0)  # zero-init: == teacher
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.05)  # as after distillation
        lo, hi = f_student(z, t, cond, w_lo)[0], f_student(z, t, cond, w_hi)[0]
        assert (lo - hi).abs().max() > 1e-3  # the output depends on w
        # added conditions reach the UNet: pooled text and time_ids each change the output
        for sl in (slice(0, 32), slice(32, 38)):
            bent = cond.clone()
            bent[:, -1, sl] += 1.0
            assert (f_student(z, t, bent, w_lo)[0] - lo).abs().max() > 1e-4
    handle.remove()
    added = seen[-1]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)
    assert seen[-1]["timestep_cond"].shape == (2, 64) and seen[-1]["encoder_hidden_states"].shape == (2, 32, 64)


def test_sdxl_v_prediction_student_one_step_is_the_teachers_x0():
    """Both families at once: a v-prediction SDXL teacher (added conditions) and its zero-init student."""
    pipe = sdxl.build_tiny_pipeline(prediction_type="v_prediction", seed=3)
    bundle = Bundle(pipe.unet.eval(), pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), None,
                    pipe.text_encoder_2, pipe.tokenizer_2)
    assert bundle.scheduler_config["prediction_type"] == "v_prediction"
    student = make_student(bundle.unet).eval()
    cond = bundle.encode_prompts(["a red circle", "a blue square"])
    shape = (4, 16, 16)
    ours = sample_student(student, bundle.scheduler_config, cond, [0, 1], shape, steps=1)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    states, added = sdxl.unpack_condition(cond, bundle.unet.config)
    with torch.no_grad():
        v = bundle.unet(z, torch.tensor([999, 999]), states, added_cond_kwargs=added).sample
    alpha, sigma = alpha_sigma_at(alphas_cumprod_from_config(bundle.scheduler_config), 999)
    c_skip, c_out = P.boundary_scalings(999)
    torch.testing.assert_close(ours, (c_skip * z + c_out * (alpha * z - sigma * v)).float(), rtol=1e-5, atol=1e-5)


def test_sdxl_lcd_step_uses_zero_uncond_and_trains_cond_proj(sdxl_bundle):
    data = world_data(sdxl_bundle, 4)
    assert data.text_states.shape == (4, 33, 64) and not data.uncond_states[:, :-1].any()
    assert data.uncond_states[0, -1, 32:38].tolist() == [64, 64, 0, 0, 64, 64]
    task = LCDTask(sdxl_bundle.unet, sdxl_bundle.scheduler_config, data, LCDConfig(batch_size=2))
    seen = []
    handle = task.teacher.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    loss, _ = task.loss(task.batch(0), 0)
    handle.remove()
    assert [kw["added_cond_kwargs"]["text_embeds"].shape[0] for kw in seen] == [4]  # [cond; uncond] in one pass
    assert not seen[0]["added_cond_kwargs"]["text_embeds"][2:].any()  # the uncond half: zero pooled embedding
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert task.student_unet.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    assert task.student_unet.add_embedding.linear_1.weight.grad.abs().sum() > 0


def test_sdxl_distill_cli_exports_a_folder_diffusers_sdxl_lcm_samples_like_ours(tiny_sdxl, tmp_path, capsys):
    """`lcm distill` on the tiny SDXL folder -> StableDiffusionXLPipeline + LCMScheduler folder; diffusers' SDXL
    pipeline (w embedding from guidance_scale - 1, no CFG) and our sampler give the same latents."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lcm-sdxl"
    main(["distill", "--teacher", str(tiny_sdxl), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
          "--num-data", "4", "--validate-every", "0", "--lr", "1e-2", "--time-cond-proj-dim", "64"])
    assert capsys.readouterr().out.strip().endswith(str(out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "LCMScheduler"
    assert index["force_zeros_for_empty_prompt"] is True
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    lcm = Bundle.load(out)
    assert lcm.is_lcm and lcm.is_sdxl and lcm.unet.config.time_cond_proj_dim == 64
    assert torch.count_nonzero(lcm.unet.time_embedding.cond_proj.weight) > 0  # trained: w now matters
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    for steps in (1, 4):
        g = torch.Generator().manual_seed(5)
        latents = torch.randn((1, 4, 16, 16), generator=g)  # draw 0; LCMScheduler's step noises are draws 1, 2, ...
        ref = pipe(prompt, num_inference_steps=steps, guidance_scale=8.5, latents=latents, generator=g,
                   output_type="latent").images
        ours = lcm.sample_latents([prompt], [5], "lcm", steps, 8.5)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
        if steps == 1:
            other_w = lcm.sample_latents([prompt], [5], "lcm", 1, 3.0)
            assert (other_w - ours).abs().max() > 1e-6  # the distilled student's output moves with w
