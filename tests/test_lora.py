"""LCM-LoRA (LCM-LoRA, arXiv 2311.05556): a LoRA strategy of the one loop, and files diffusers and kohya tools load."""
import json

import pytest
import torch
from safetensors.torch import load_file

from latentcm import world
from latentcm.cli import main
from latentcm.models import lora as lora_io
from latentcm.bundle import Bundle
from latentcm.models.denoiser import Denoiser
from latentcm.sampling.student import sample_student
from latentcm.training.checkpoint import list_checkpoints
from latentcm.training.consistency import LCDConfig
from latentcm.training.data.tensors import encode_pairs
from latentcm.training.loop import LoopConfig, fit
from latentcm.models.lora import ADAPTER, TARGET_ADAPTER, LoRAConfig
from latentcm.training.consistency import LoRATask

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def data(micro_teacher):
    b = Bundle.load(micro_teacher)
    pairs = [(s.image, s.text) for s in world.iter_samples(0, 6)]
    return encode_pairs(b.vae, b.text_encoder, b.tokenizer, pairs)


RUN_ARGS = ["--lora", "4", "--lora-alpha", "8", "--batch-size", "2", "--num-data", "4", "--lr", "1e-2",
            "--gradient-checkpointing"]  # exact recomputation: the exports and resume checks hold with it


@pytest.fixture(scope="module")
def lora_run(micro_teacher, tmp_path_factory):
    """`lcm distill --lora 4 --lora-alpha 8` for two steps (alpha != rank: the scale 2 must survive every export)."""
    out = tmp_path_factory.mktemp("lora") / "lcm-lora"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2", "--validate-every", "0",
          *RUN_ARGS])
    return out


def _task(micro_teacher, data, lora=LoRAConfig(rank=4), **kw):
    """A LoRATask on a freshly loaded teacher UNet (the adapter is injected in place)."""
    b = Bundle.load(micro_teacher)
    return LoRATask(b.unet, b.scheduler_config, data, LCDConfig(**{"batch_size": 2, "ema_decay": 0.0, **kw}), lora)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 16, 16, generator=g), torch.tensor([19, 499, 999]), torch.randn(3, 32, 32, generator=g)


def _randomise_adapter(task):
    with torch.no_grad():
        for p in task.lora.parameters():
            p.copy_(0.3 * torch.randn_like(p))


def test_teacher_is_the_same_unet_with_adapters_off_and_equals_the_original(micro_teacher, data):
    fresh = Bundle.load(micro_teacher)
    original = fresh.unet
    task = _task(micro_teacher, data)
    _randomise_adapter(task)  # B = 0 at init would hide an adapter left on
    z, t, text = _inputs()
    with torch.no_grad():
        x0_ref, eps_ref = Denoiser(original, fresh.scheduler_config)(z, t, text)
        x0, eps = task.teacher(z, t, text)
        x0_student, _ = task.student.denoiser(z, t, text)
    assert torch.equal(x0, x0_ref) and torch.equal(eps, eps_ref)
    assert not torch.allclose(x0_student, x0_ref, atol=1e-3)  # the adapter is on for the student
    # one UNet in memory: teacher, student and target all wrap task.student_unet
    assert task.teacher.unet.unet is task.student_unet is task.student.denoiser.unet is task.target.denoiser.unet
    # after the teacher pass the adapter is active and trainable again
    assert task.student_unet.active_adapters() == [ADAPTER]
    assert all(p.requires_grad for p in task.parameters())


def test_only_lora_parameters_train_and_base_weights_stay_bit_identical(micro_teacher, data, tmp_path):
    task = _task(micro_teacher, data)
    base = {k: v.clone() for k, v in task.student_unet.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in task.lora.state_dict().items()}
    trainable = {id(p) for p in task.student_unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in task.parameters()} and len(trainable) == len(lora)
    assert all(".lora_" in k for k, p in task.student_unet.named_parameters() if p.requires_grad)
    assert fit(task, LoopConfig(max_steps=2, lr=1e-2, warmup=0, schedule="constant"), tmp_path) == 2
    after = task.student_unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(not torch.equal(task.lora.state_dict()[k], v) for k, v in lora.items() if "lora_B" in k)
    ckpt = load_file(str(list_checkpoints(tmp_path / "checkpoints")[-1]))
    saved = {k for k in ckpt if k.startswith("module.")}
    assert saved == {f"module.lora.{k}" for k in lora}  # the adapter only, not the base UNet


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_two_step_resume_equals_an_uninterrupted_run(micro_teacher, data, tmp_path, ema):
    cfg = LoopConfig(max_steps=2, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=1)
    full = _task(micro_teacher, data, ema_decay=ema)
    assert fit(full, cfg, tmp_path / "a") == 2
    assert fit(_task(micro_teacher, data, ema_decay=ema), LoopConfig(**{**cfg.__dict__, "max_minutes": 1e-9}),
               tmp_path / "b") == 1
    resumed = _task(micro_teacher, data, ema_decay=ema)
    assert fit(resumed, cfg, tmp_path / "b", resume=True) == 2
    for name in resumed.modules():
        a, b = full.modules()[name].state_dict(), resumed.modules()[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("lora_target" in resumed.modules()) == (ema > 0)


def test_ema_target_is_an_adapter_copy_that_moves_toward_the_student(micro_teacher, data, tmp_path):
    task = _task(micro_teacher, data, ema_decay=0.5)
    assert sorted(task.student_unet.peft_config) == sorted([ADAPTER, TARGET_ADAPTER])
    start = {k: v.clone() for k, v in task.lora_target.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in task.lora.state_dict().items())  # theta^- <- theta
    fit(task, LoopConfig(max_steps=1, lr=1e-2, warmup=0, schedule="constant"), tmp_path)
    online, target = task.lora.state_dict(), task.lora_target.state_dict()
    for k in start:
        torch.testing.assert_close(target[k], 0.5 * start[k] + 0.5 * online[k])
    assert task.student_unet.active_adapters() == [ADAPTER]


def test_distill_lora_cli_exports_files_and_a_card(lora_run, micro_teacher):
    names = {p.name for p in lora_run.iterdir()}
    assert {lora_io.DIFFUSERS_NAME, lora_io.KOHYA_NAME, "scheduler_config.json", "README.md"} <= names
    assert "model_index.json" not in names and "unet" not in names
    card = (lora_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "lcm-lora" in card.split("---")[1]
    assert "lcm distill --teacher" in card and "--lora 4" in card and "fixed w = 7.5" in card
    sched = json.loads((lora_run / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50
    sd = load_file(str(lora_run / lora_io.DIFFUSERS_NAME))
    assert sd and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in sd)
    assert any(torch.count_nonzero(v) for k, v in sd.items() if ".lora_B." in k)  # it trained (B starts at 0)
    ranks = {v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    assert ranks == {4}


def test_cli_resume_gives_the_uninterrupted_adapter(lora_run, micro_teacher, tmp_path):
    out = tmp_path / "resumed"
    base = ["distill", "--teacher", str(micro_teacher), "--out", str(out), "--checkpoint-every", "1", *RUN_ARGS]
    main([*base, "--max-steps", "1", "--validate-every", "0"])
    with pytest.raises(SystemExit):  # a second run over checkpoints needs --resume
        main([*base, "--max-steps", "2", "--validate-every", "0"])
    main([*base, "--max-steps", "2", "--validate-every", "2", "--resume"])
    a = load_file(str(lora_run / lora_io.DIFFUSERS_NAME))
    b = load_file(str(out / lora_io.DIFFUSERS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "previews" / "lcd-0000002.png").is_file()  # the validation grid samples the LoRA student


def test_diffusers_loads_the_lora_and_samples_like_ours(lora_run, micro_teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_run)
    pipe.scheduler = LCMScheduler.from_pretrained(lora_run)
    ours = Bundle.load(micro_teacher, loras=[(str(lora_run), 1.0)])
    assert ours.is_lcm and ours.unet.config.time_cond_proj_dim is None
    for steps in (1, 4):
        g = torch.Generator().manual_seed(5)
        latents = torch.randn((1, 4, 16, 16), generator=g)  # draw 0; the pipeline's step noises are draws 1, 2, ...
        ref = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, latents=latents, generator=g,
                   output_type="latent").images
        mine = ours.sample_latents([PROMPT], [5], steps=steps)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-4)
    # and the adapter matters: without it the teacher's LCM-sampled latents differ
    plain = Bundle.load(micro_teacher)
    states = plain.encode_prompts([PROMPT])
    base = sample_student(plain.unet, ours.scheduler_config, states, [5], (4, 16, 16), steps=4)
    assert not torch.allclose(base, mine, atol=1e-4)


def test_kohya_file_keys_count_and_round_trip(lora_run, micro_teacher):
    peft_sd = {k.removeprefix("unet."): v for k, v in load_file(str(lora_run / lora_io.DIFFUSERS_NAME)).items()}
    kohya = load_file(str(lora_run / lora_io.KOHYA_NAME))
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    ups = [k for k in kohya if k.endswith(".lora_up.weight")]
    alphas = [k for k in kohya if k.endswith(".alpha")]
    assert all(k.startswith("lora_unet_") and "." not in k.split(".")[0][len("lora_unet_"):] for k in kohya)
    assert len(downs) + len(ups) == len(peft_sd) and len(alphas) == len(downs) == len(ups)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in kohya
    assert all(kohya[k].ndim == 0 and float(kohya[k]) == 8.0 for k in alphas)
    names = [n for n, _ in Bundle.load(micro_teacher).unet.named_modules()]
    back, alpha_of = lora_io.from_kohya(kohya, names)
    assert back.keys() == peft_sd.keys() and all(torch.equal(back[k], peft_sd[k]) for k in back)
    assert set(alpha_of.values()) == {8.0} and len(alpha_of) == len(downs)
    assert lora_io.to_kohya(back, 8.0).keys() == kohya.keys()


def test_diffusers_loads_the_kohya_file_to_the_same_unet(lora_run, micro_teacher):
    a = Bundle.load(micro_teacher, loras=[(str(lora_run / lora_io.DIFFUSERS_NAME), 1.0)])
    b = Bundle.load(micro_teacher, loras=[(str(lora_run / lora_io.KOHYA_NAME), 1.0)])
    z, t, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(b.unet(z, t, text).sample, a.unet(z, t, text).sample, rtol=0, atol=1e-5)


def test_generate_stacks_loras_with_weights(lora_run, micro_teacher, tmp_path, capsys):
    half = Bundle.load(micro_teacher, loras=[(str(lora_run), 0.5)])
    split = Bundle.load(micro_teacher, loras=[(str(lora_run), 0.25), (str(lora_run), 0.25)])
    a, b = (m.sample_latents([PROMPT], [1], steps=2) for m in (split, half))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # 0.25 B A + 0.25 B A vs 0.5 B A: float rounding only
    assert lora_io.parse_lora_spec("runs/x:0.8") == ("runs/x", 0.8)
    assert lora_io.parse_lora_spec("runs/x") == ("runs/x", 1.0)
    out = tmp_path / "grid.png"
    main(["generate", PROMPT, "--model", str(micro_teacher), "--lora", f"{lora_run}:0.8", "--lora", str(lora_run),
          "--steps", "2", "--num-images", "2", "--out", str(out)])
    assert out.is_file() and capsys.readouterr().out.strip().endswith(str(out))


@pytest.mark.parametrize("args, needle", [
    (["--lora-alpha", "8"], "--lora-alpha needs --lora"),
    (["--lora", "4", "--ema", "0.5", "--solver", "euler"], "--solver"),
])
def test_distill_lora_bad_input_is_one_line_and_exit_2(micro_teacher, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher", str(micro_teacher), "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and needle in err


def test_lora_on_an_lcm_folder_is_refused(micro_teacher, data):
    from latentcm.models.lora import add_lora
    from latentcm.models.denoiser import make_student

    with pytest.raises(ValueError, match="already has a w embedding"):
        add_lora(make_student(Bundle.load(micro_teacher).unet), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_style_lora_trains_only_the_adapter_and_stacks_with_an_lcm_lora(lora_run, micro_teacher, tmp_path, capsys):
    """`finetune-teacher --lora`: a diffusion style LoRA, loadable by diffusers, combined with the LCM-LoRA."""
    from diffusers import StableDiffusionPipeline

    from latentcm import styles

    data = styles.export_styled(tmp_path / "data", seed=0, count=4)
    style = tmp_path / "style"
    main(["finetune-teacher", "--teacher", str(micro_teacher), "--data", str(data), "--out", str(style),
          "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--lora", "4"])
    assert not (style / "unet").exists() and "rank-4 LoRA" in (style / "README.md").read_text()
    sd = load_file(str(style / lora_io.DIFFUSERS_NAME))
    assert sd and all("lora_A" in k or "lora_B" in k for k in sd)
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)  # B started at 0: it trained
    pipe = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True, safety_checker=None)
    z, t, text = _inputs()
    with torch.no_grad():
        before = pipe.unet(z, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(style))
        assert not torch.allclose(before, pipe.unet(z, t, encoder_hidden_states=text).sample)
    lcm_only = Bundle.load(micro_teacher, loras=[(str(lora_run), 1.0)])
    both = Bundle.load(micro_teacher, loras=[(str(lora_run), 1.0), (str(style), 0.8)])
    assert both.scheduler_config["_class_name"] == "LCMScheduler"  # the LCM-LoRA's grid, listed first
    a, b = (m.sample_latents([PROMPT], [1], steps=2) for m in (lcm_only, both))
    assert not torch.allclose(a, b)  # the style adapter changes the 2-step LCM sample
