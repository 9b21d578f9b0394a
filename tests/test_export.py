"""`lcm export`: a diffusers pipeline folder, its fp16 variant, the single file and the model card."""
import json

import pytest
import torch
from safetensors.torch import load_file

from latentcm.cli import main
from latentcm.bundle import Bundle
from latentcm.export.single_file import FORMAT, load_single_file, save_single_file
from latentcm.export.release import split_front_matter

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def exported(micro_lcm, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "micro-release"
    main(["export", "--model", str(micro_lcm), "--out", str(out), "--fp16", "--single-file",
          "--base-model", "my-org/tiny-teacher"])
    return out


def _latents(pipe, seed=5, steps=2):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.5, generator=torch.Generator().manual_seed(seed),
                output_type="latent").images


def test_export_is_a_complete_pipeline_folder_without_run_files(exported, micro_lcm):
    names = {p.name for p in exported.iterdir()}
    assert names == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md",
                     "micro-release.safetensors", "sampling.json"}
    assert json.loads((exported / "sampling.json").read_text()) == {"timestep_schedule": "grid"}
    assert Bundle.load(exported).timestep_schedule == Bundle.load(micro_lcm).timestep_schedule == "grid"
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"] == ["diffusers",
                                                                                                "LCMScheduler"]
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["original_inference_steps"] == 50 and sched["timestep_scaling"] == 10.0
    assert not list(exported.parent.glob(".*tmp"))


def test_diffusers_loads_the_export_and_samples_like_the_source(micro_lcm, exported):
    from diffusers import LatentConsistencyModelPipeline

    src = LatentConsistencyModelPipeline.from_pretrained(micro_lcm, local_files_only=True)
    exp = LatentConsistencyModelPipeline.from_pretrained(exported, local_files_only=True)
    assert exp.unet.dtype == torch.float32
    assert torch.equal(_latents(src), _latents(exp))


def test_fp16_variant_loads_in_float16(exported):
    from diffusers import LatentConsistencyModelPipeline

    weights = load_file(str(exported / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert (exported / "text_encoder" / "model.fp16.safetensors").is_file()
    assert (exported / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = LatentConsistencyModelPipeline.from_pretrained(exported, variant="fp16", torch_dtype=torch.float16,
                                                          local_files_only=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    full = Bundle.load(exported).unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, full[key].half()), key


def test_single_file_round_trips_to_identical_tensors(micro_lcm, exported):
    from safetensors import safe_open

    path = exported / "micro-release.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert {k.split(".")[0] for k in f.keys()} == {"model", "first_stage_model", "cond_stage_model", "latentcm"}
    src, restored = Bundle.load(micro_lcm), load_single_file(path)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(src, part).state_dict(), getattr(restored, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert restored.scheduler_config == src.scheduler_config and restored.is_lcm
    assert restored.tokenizer(PROMPT).input_ids == src.tokenizer(PROMPT).input_ids
    assert torch.equal(restored.sample_latents([PROMPT], [3], steps=2), src.sample_latents([PROMPT], [3], steps=2))


def test_single_file_keeps_a_requested_dtype(micro_lcm, tmp_path):
    path = save_single_file(Bundle.load(micro_lcm), tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_single_file(path).unet.dtype == torch.float16


def test_card_front_matter_parses(exported):
    yaml = pytest.importorskip("yaml")
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "my-org/tiny-teacher"
    assert meta["pipeline_tag"] == "text-to-image"
    assert {"latent-consistency-model", "lcm", "text-to-image"} <= set(meta["tags"])
    assert meta["inference"]["parameters"] == {"num_inference_steps": 4, "guidance_scale": 8.5}
    assert split_front_matter(card)[0]["base_model"] == "my-org/tiny-teacher"
    assert 'variant="fp16"' in card and "## Source model card" in card


def test_base_model_defaults_to_the_source_folder_name(micro_lcm, tmp_path, capsys):
    out = tmp_path / "plain"
    main(["export", "--model", str(micro_lcm), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert split_front_matter((out / "README.md").read_text())[0]["base_model"] == micro_lcm.name
    assert not list(out.glob("**/*.fp16.safetensors")) and not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("case, needle", [("teacher", "not an LCM"), ("not-empty", "not empty"),
                                          ("same", "source folder"), ("missing", "model_index.json")])
def test_export_bad_input_is_one_line_and_exit_2(micro_lcm, micro_teacher, tmp_path, capsys, case, needle):
    model = {"teacher": micro_teacher, "missing": tmp_path / "nothing"}.get(case, micro_lcm)
    out = {"same": micro_lcm}.get(case, tmp_path / "out")
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and needle in err, err
