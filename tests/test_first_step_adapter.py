"""The unguided first-step LoRA: a low-rank weight difference (``models.low_rank``) that an LCM folder applies at the
first step of unguided sampling only (sampling.json's ``unguided``; ``sampling.student``)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentcm.bundle import Bundle
from latentcm.bundle.loading import load_first_step
from latentcm.errors import ModelError
from latentcm.models.low_rank import difference_energy, lora_from_difference, merge_lora
from latentcm.sampling.options import ModelTraits, SamplingOptions

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SEEDS = ["a red circle on a blue background", "a small green star"], [5, 6]
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def low_rank_tuned(state: dict, rank: int, seed: int = 0, bias: bool = True) -> dict:
    """``state`` plus a random rank-``rank`` difference on every 2-D / 4-D weight (and, with ``bias``, a changed
    bias)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in state.items():
        if w.ndim >= 2:
            flat = w.reshape(w.shape[0], -1)
            b, a = torch.randn(flat.shape[0], rank, generator=g), torch.randn(rank, flat.shape[1], generator=g)
            w = w + (0.01 * b @ a).reshape(w.shape)
        elif bias and k.endswith("bias"):
            w = w + 0.001
        out[k] = w
    return out


def test_a_low_rank_difference_is_recovered_exactly_and_the_bias_change_reported():
    base = {"a.weight": torch.randn(6, 5), "c.weight": torch.randn(3, 2, 3, 3), "c.bias": torch.randn(3),
            "thin.weight": torch.randn(2, 7)}
    tuned = low_rank_tuned(base, 2)
    lora = lora_from_difference(base, tuned, 2)
    assert lora["unet.c.lora_A.weight"].shape == (2, 2, 3, 3) and lora["unet.c.lora_B.weight"].shape == (3, 2, 1, 1)
    merged = merge_lora(base, lora)
    for k in ("a.weight", "c.weight", "thin.weight"):
        torch.testing.assert_close(merged[k], tuned[k], rtol=0, atol=1e-5)
    assert torch.equal(merged["c.bias"], base["c.bias"])  # 1-D: not low-rank, left out
    energy = difference_energy(base, tuned, lora)
    assert energy["kept"] == pytest.approx(1.0, abs=1e-9) and 0 < energy["one_dimensional"] < 1


def test_a_lower_rank_keeps_the_top_singular_directions_and_pads_a_thin_layer():
    base = {"a.weight": torch.zeros(8, 8), "thin.weight": torch.zeros(2, 8)}
    tuned = {"a.weight": torch.diag(torch.arange(8.0, 0, -1)), "thin.weight": torch.ones(2, 8)}
    lora = lora_from_difference(base, tuned, 3)
    torch.testing.assert_close(merge_lora(base, lora)["a.weight"],
                               torch.diag(torch.tensor([8.0, 7, 6, 0, 0, 0, 0, 0])), rtol=0, atol=1e-5)
    assert lora["unet.thin.lora_A.weight"].shape == (3, 8)  # at most rank 2 ([2, 8]): padded to 3 with a zero row
    assert not lora["unet.thin.lora_A.weight"][2:].any() and not lora["unet.thin.lora_B.weight"][:, 2:].any()
    assert difference_energy(base, tuned, lora)["kept"] == pytest.approx((8**2 + 7**2 + 6**2 + 16) / (204 + 16))
    with pytest.raises(ValueError, match="different keys"):
        lora_from_difference(base, {"a.weight": torch.zeros(8, 8)}, 3)
    with pytest.raises(KeyError, match="names no weight"):
        merge_lora({"a.weight": torch.zeros(8, 8)}, lora)


@pytest.fixture(scope="module")
def adapted_lcm(micro_lcm, tmp_path_factory):
    """(adapted, tuned, base): the micro LCM as distilled from w = 0 (base), a random rank-2 change of its UNet
    (tuned), and base with the unguided first-step LoRA of that change (adapted), made by the script."""
    base = tmp_path_factory.mktemp("base") / "lcm"
    shutil.copytree(micro_lcm, base)
    settings = json.loads((base / "sampling.json").read_text())
    (base / "sampling.json").write_text(json.dumps({**settings, "unguided_w0": True}))
    tuned = tmp_path_factory.mktemp("tuned") / "lcm"
    shutil.copytree(base, tuned)
    state = load_file(str(micro_lcm / UNET_FILE))
    save_file(low_rank_tuned(state, 2, bias=False), str(tuned / UNET_FILE))
    out = tmp_path_factory.mktemp("adapted") / "lcm"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "first_step_adapter.py"), "--base", str(base),
                           "--tuned", str(tuned), "--rank", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "keeps 100.0%" in done.stdout
    return out, tuned, base


def test_the_merged_lora_equals_diffusers_lora_loader(adapted_lcm):
    from latentcm.bundle.lora import load_loras

    folder = adapted_lcm[0]
    ours = Bundle.load(folder)
    theirs = Bundle.load(folder)
    load_loras(theirs, [(str(folder / "unguided_first_step.safetensors"), 1.0)])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 999])
    cond, w = ours.encode_prompts(PROMPTS), torch.zeros(2, ours.unet.config.time_cond_proj_dim)
    with torch.no_grad():
        a = ours.first_step_unet(x, t, encoder_hidden_states=cond, timestep_cond=w).sample
        b = theirs.unet(x, t, encoder_hidden_states=cond, timestep_cond=w).sample
        plain = ours.unet(x, t, encoder_hidden_states=cond, timestep_cond=w).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (a - plain).abs().max() > 1e-3


def test_unguided_sampling_uses_the_adapter_at_its_first_step_only(adapted_lcm):
    folder, tuned, base = adapted_lcm
    adapted, plain, whole = Bundle.load(folder), Bundle.load(base), Bundle.load(tuned)

    def latents(bundle, **kw):
        return bundle.sample_latents(PROMPTS, SEEDS, "lcm", **kw)
    # one step at g = 1 is the merged network's, and close to the tuned one's (the file is fp16)
    merged = Bundle.load(base)
    merged.unet = adapted.first_step_unet
    one = latents(adapted, steps=1, guidance=1.0)
    assert torch.equal(one, latents(merged, steps=1, guidance=1.0))
    torch.testing.assert_close(one, latents(whole, steps=1, guidance=1.0), rtol=0, atol=2e-2)
    assert (one - latents(plain, steps=1, guidance=1.0)).abs().max() > 0.1
    # a negative prompt (real CFG between w = 0 predictions) also reads w = 0: its first step is the merged network's
    negative = {"guidance": 2.0, "negative_prompt": "blue"}
    assert torch.equal(latents(adapted, steps=1, **negative), latents(merged, steps=1, **negative))
    assert (latents(adapted, steps=1, **negative) - latents(plain, steps=1, **negative)).abs().max() > 0.1
    # guided (w > 0), or from below the top point: the plain LCM, bit for bit
    for kw in ({"steps": 4, "guidance": 2.0}, {"steps": 2, "guidance": 1.0, "timesteps": [899, 499]},
               {"steps": 2, "guidance": 2.0, "timesteps": [899, 499], "negative_prompt": "blue"}):
        assert torch.equal(latents(adapted, renoise="fresh", **kw), latents(plain, renoise="fresh", **kw))
    # four unguided steps: the first from the adapter, the refining ones from the plain LCM
    four = latents(adapted, steps=4, guidance=1.0, renoise="fresh")
    assert (four - latents(plain, steps=4, guidance=1.0, renoise="fresh")).abs().max() > 1e-4
    assert (four - latents(whole, steps=4, guidance=1.0, renoise="fresh")).abs().max() > 1e-4


def test_unguided_sampling_takes_the_folders_renoise_unless_one_is_given(adapted_lcm):
    folder = adapted_lcm[0]
    assert json.loads((folder / "sampling.json").read_text())["unguided"]["renoise"] == "keep-means"
    bundle = Bundle.load(folder)
    assert bundle.sampling_options(guidance=1.0).renoise == "keep-means"
    assert bundle.sampling_options(guidance=1.0, renoise="fresh").renoise == "fresh"
    assert bundle.sampling_options(guidance=2.0).renoise == bundle.renoise == "fresh"
    model = ModelTraits(is_lcm=True, original_inference_steps=20, unguided_w0=True, unguided_renoise="keep-means")
    assert SamplingOptions(guidance=1.0, negative_prompt="x").resolve(model).renoise == "fresh"
    assert SamplingOptions(guidance=1.0, gamma=0.3).resolve(model).renoise == "fresh"
    torch.testing.assert_close(bundle.sample_latents(PROMPTS, SEEDS, "lcm", 4, 1.0),
                               bundle.sample_latents(PROMPTS, SEEDS, "lcm", 4, 1.0, renoise="keep-means"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("entry, message", [
    ("first_step.safetensors", "unguided must be an object"),
    ({"first_step": "../x.safetensors"}, "a .safetensors file in the folder"),
    ({"first_step": "adapter.bin"}, "a .safetensors file in the folder"),
    ({"renoise": "ddpm"}, "unguided renoise must be one of"),
    ({"first_step": "missing.safetensors"}, "does not exist"),
    ({"first_step": "other.safetensors"}, "cannot load the unguided first_step LoRA"),
])
def test_a_bad_unguided_entry_is_one_model_error(micro_lcm, tmp_path, entry, message):
    folder = tmp_path / "lcm"
    shutil.copytree(micro_lcm, folder)
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 3), "unet.nowhere.lora_B.weight": torch.zeros(3, 2)},
              str(folder / "other.safetensors"))
    settings = json.loads((folder / "sampling.json").read_text())
    (folder / "sampling.json").write_text(json.dumps({**settings, "unguided": entry}))
    with pytest.raises(ModelError, match=message) as caught:
        Bundle.load(folder)
    assert "\n" not in str(caught.value)


def test_a_runtime_unet_cannot_take_the_adapter(tmp_path):
    (tmp_path / "a.safetensors").touch()
    with pytest.raises(ModelError, match="needs the PyTorch UNet"):
        load_first_step(object(), tmp_path, {"first_step": "a.safetensors"})


def test_a_release_export_carries_the_adapter(adapted_lcm, tmp_path):
    from latentcm.export.release import export_release

    folder = adapted_lcm[0]
    lines = []
    dest = export_release(folder, tmp_path / "release", progress=lines.append)
    assert (dest / "unguided_first_step.safetensors").is_file()
    assert any("carried the unguided sampling" in line for line in lines)
    a = Bundle.load(dest).sample_latents(PROMPTS, SEEDS, "lcm", 4, 1.0)
    torch.testing.assert_close(a, Bundle.load(folder).sample_latents(PROMPTS, SEEDS, "lcm", 4, 1.0), rtol=0, atol=1e-5)


def test_diffusers_samples_g1_as_latentcm_with_the_cards_recipe(adapted_lcm):
    """The card's recipe: the LoRA loaded into diffusers' pipeline and switched off after the first step, with the
    keep-means scheduler, gives latentcm's unguided latents."""
    from diffusers import LatentConsistencyModelPipeline

    from latentcm.export.scheduler import KeepMeansLCMScheduler

    folder = adapted_lcm[0]
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, weight_name="unguided_first_step.safetensors", adapter_name="unguided")
    pipe.disable_lora()
    generators = lambda: [torch.Generator().manual_seed(s) for s in SEEDS]  # noqa: E731
    guided = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, output_type="latent", generator=generators())
    off = lambda pipe, i, t, kwargs: (pipe.disable_lora() if i == 0 else None) or kwargs  # noqa: E731
    pipe.enable_lora()
    pipe.scheduler = KeepMeansLCMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="latent", generator=generators(),
               callback_on_step_end=off).images
    bundle = Bundle.load(folder)
    torch.testing.assert_close(bundle.sample_latents(PROMPTS, SEEDS, "lcm", 4, 1.0, schedule="grid"), ref,
                               rtol=0, atol=1e-3)
    torch.testing.assert_close(bundle.sample_latents(PROMPTS, SEEDS, "lcm", 4, 3.0, schedule="grid"), guided.images,
                               rtol=0, atol=1e-4)
