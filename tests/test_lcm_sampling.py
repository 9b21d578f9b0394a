"""LCM sampling through the Bundle, the CLI (generate, compare, evaluate --preset lcm) and the benchmark,
on micro folders."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentcm import registry
from latentcm.cli import default_model, main
from latentcm.evaluation import presets, references
from latentcm.evaluation.compare import LABEL_MARGIN
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.scoring import SCORED
from latentcm.evaluation.presets import LCM_TABLE_ROWS
from latentcm.evaluation.presets import teacher as evaluate_teacher
from latentcm.bundle import LCM_DEFAULTS, Bundle, ModelError, check_kind
from latentcm.models.denoiser import make_student
from latentcm.models.judge import Judge
from latentcm.export.pipeline import export_lcm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro_lcm(micro_teacher, tmp_path_factory):
    """An exported micro LCM whose w-projection is random (zero-init would hide the guidance path)."""
    teacher = Bundle.load(micro_teacher)
    torch.manual_seed(0)
    student = make_student(teacher.unet).eval()
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.05)
    return export_lcm(student, teacher, tmp_path_factory.mktemp("lcm") / "lcm", {"command": "pytest"}, skip=20)


@pytest.fixture(scope="module")
def lcm(micro_lcm):
    return Bundle.load(micro_lcm)


@pytest.fixture(scope="module")
def micro_judge(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("judge")
    Judge(width=8).save(folder)
    return folder


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_lcm_bundle_is_recognised(lcm, micro_teacher):
    assert lcm.is_lcm and lcm.original_inference_steps == 50 and lcm.defaults == LCM_DEFAULTS
    assert lcm.scheduler_config["timestep_scaling"] == 10.0
    teacher = Bundle.load(micro_teacher)
    assert not teacher.is_lcm and teacher.original_inference_steps is None and teacher.defaults[0] == "ddim"
    with pytest.raises(ModelError, match="LCMScheduler and a UNet with time_cond_proj_dim"):
        check_kind({"time_cond_proj_dim": None}, {"_class_name": "LCMScheduler"}, Path("x"))
    with pytest.raises(ModelError, match="real CFG on a guidance-distilled LCM over-saturates"):
        check_kind({"time_cond_proj_dim": 256}, {"_class_name": "LCMScheduler"}, Path("x"), "cfg")
    check_kind({"time_cond_proj_dim": None}, {"_class_name": "LCMScheduler"}, Path("x"), "cfg")  # a real-CFG LCM
    check_kind({"time_cond_proj_dim": 256}, {"_class_name": "DDIMScheduler"}, Path("x"))  # a guided teacher


STEP_PROMPTS, STEP_SEEDS = ["a red circle on a blue background"] * 2, [0, 1]


@pytest.fixture(scope="module")
def lcm_pipe(micro_lcm):
    """diffusers' own LatentConsistencyModelPipeline on the same folder: the independent reference."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(micro_lcm, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def one_step_images(lcm):
    return lcm.generate(STEP_PROMPTS, STEP_SEEDS, "lcm", 1, 8.5)


@pytest.mark.parametrize("steps", range(1, 9))
def test_every_step_count_gives_the_reference_images(lcm, lcm_pipe, one_step_images, steps):
    """Each step count's images equal diffusers' pipeline (its LCMScheduler timesteps, per-seed generators,
    VAE decode), depend on the seed, and differ from the 1-step images."""
    images = lcm.generate(STEP_PROMPTS, STEP_SEEDS, "lcm", steps, 8.5)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    ref = lcm_pipe(STEP_PROMPTS, num_inference_steps=steps, guidance_scale=8.5, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in STEP_SEEDS]).images  # [B, 3, H, W] in [0, 1]
    torch.testing.assert_close(images, ref * 2 - 1, rtol=0, atol=1e-4)
    assert (images[0] - images[1]).abs().max() > 0.1  # same prompt, other seed: another image
    if steps > 1:
        assert (images - one_step_images).abs().max() > 0.05  # more steps refine the 1-step image


def test_images_do_not_depend_on_batch_composition(lcm):
    pair = lcm.generate(["a red circle", "a blue square"], [3, 4], "lcm", 4, 8.5)
    single = lcm.generate(["a blue square"], [4], "lcm", 4, 8.5)
    torch.testing.assert_close(pair[1], single[0], rtol=0, atol=1e-5)
    assert not torch.allclose(pair[0], lcm.generate(["a red circle"], [5], "lcm", 4, 8.5)[0])


@pytest.mark.parametrize("steps, guidance", [(1, 8.5), (2, 3.0), (4, 8.5), (8, 1.5)])
def test_equals_diffusers_lcm_pipeline(micro_lcm, lcm, steps, guidance):
    """Same folder, same per-seed streams (initial latents = draw 0, step noises = draws 1, 2, ...)."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(micro_lcm, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red circle on a blue background", "a small green star"], [7, 8]
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = lcm.sample_latents(prompts, seeds, "lcm", steps, guidance)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_cli_generate_picks_lcm_defaults_for_an_lcm(micro_lcm, tmp_path, capsys):
    auto, explicit = tmp_path / "auto.png", tmp_path / "explicit.png"
    main(["generate", "a red circle", "--model", str(micro_lcm), "--num-images", "2", "--out", str(auto)])
    main(["generate", "a red circle", "--model", str(micro_lcm), "--sampler", "lcm", "--steps", "4",
          "--guidance", "8.5", "--num-images", "2", "--out", str(explicit)])
    assert capsys.readouterr().out.split() == [str(auto), str(explicit)]
    assert Image.open(auto).size == (2 * 64, 64)
    assert Image.open(auto).tobytes() == Image.open(explicit).tobytes()


def test_cli_generate_lcm_beyond_eight_steps_is_allowed_on_the_grid(micro_lcm, tmp_path, capsys):
    out = tmp_path / "nine.png"
    main(["generate", "a red circle", "--model", str(micro_lcm), "--steps", "9", "--num-images", "1",
          "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()


def test_default_model_is_the_shipped_lcm_when_present(monkeypatch):
    monkeypatch.setattr(registry, "shipped_models", lambda: {"teacher": "t", "judge": "j"})
    assert default_model() == "teacher"
    monkeypatch.setattr(registry, "shipped_models", lambda: {"teacher": "t", "judge": "j", "lcm": "l"})
    assert default_model() == "lcm"
    assert "lcm" in registry.SHIPPED


@pytest.mark.parametrize("which, args, needle", [
    ("lcm", ["--steps", "0"], "--steps"),
    ("lcm", ["--steps", "51"], "original_inference_steps=50"),
    ("lcm", ["--sampler", "ddim"], "is an LCM"),
    ("teacher", ["--sampler", "lcm"], "needs an LCM folder"),
])
def test_bad_sampling_input_is_one_line_and_exit_2(micro_lcm, micro_teacher, tmp_path, capsys, which, args, needle):
    model = micro_lcm if which == "lcm" else micro_teacher
    code, _, err = run(["generate", "a red circle", "--model", str(model), "--num-images", "1",
                        "--out", str(tmp_path / "x.png"), *args], capsys)
    assert code == 2 and err.startswith("lcm: error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "x.png").exists()


def test_compare_writes_labelled_rows(micro_lcm, micro_teacher, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    main(["compare", "a red circle", "--lcm", str(micro_lcm), "--teacher", str(micro_teacher), "--num-images", "2",
          "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(out) and len(lines) == 5
    assert [ln.split(":")[0] for ln in lines[1:]] == ["LCM 1 step", "LCM 2 steps", "LCM 4 steps",
                                                     "teacher DDIM 25 steps, CFG 7.5"]
    assert all(ln.endswith(" s/image") for ln in lines[1:])
    image = Image.open(out).convert("RGB")
    assert image.size == (LABEL_MARGIN + 2 * 64, 4 * 64)
    margin = torch.tensor(list(image.crop((0, 0, LABEL_MARGIN, 4 * 64)).getdata()))
    assert (margin < 128).all(dim=1).any()  # some dark label pixels on the white margin


def test_swapped_lcm_and_teacher_is_exit_2(micro_lcm, micro_teacher, tmp_path, capsys):
    code, _, err = run(["compare", "a red circle", "--lcm", str(micro_teacher), "--teacher", str(micro_lcm),
                        "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and "swap --lcm and --teacher" in err and err.count("\n") == 1


def test_evaluate_lcm_writes_results_json_and_table(micro_lcm, micro_teacher, micro_judge, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "eval"
    main(["evaluate", "--preset", "lcm", "--model", str(micro_lcm), "--teacher", str(micro_teacher),
          "--judge", str(micro_judge), "--num-samples", "4", "--batch-size", "4", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["num_samples"] == 4 and result["lcm"] == str(micro_lcm)
    rows = result["rows"]
    assert [(r["model"], r["sampler"], r["steps"], r["guidance"]) for r in rows] == \
        [tuple(r)[:4] for r in LCM_TABLE_ROWS]
    for r in rows:
        assert r["unet_evals_per_image"] == (r["steps"] if r["sampler"] == "lcm" else 2 * r["steps"])
        assert set(r["attribute_accuracy"]) <= set(SCORED) and {"colour", "shape"} <= set(r["attribute_accuracy"])
        assert all(0 <= v <= 1 for v in r["attribute_accuracy"].values()) and r["seconds"] >= 0
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) + 1 and "UNet evals / image" in table[0]  # + the real-image floor
    # sampling intervals by default, and each teacher row paired with the LCM at its step count
    assert "KID×10³ [95%]" in table[0] and "±" not in "".join(table)
    lcm = {r["steps"]: r["intervals"]["kid"]["value"] for r in rows if r["sampler"] == "lcm"}
    for r in rows:
        lo, hi = r["intervals"]["kid"]["ci"]
        assert lo <= hi
        if r["steps"] in lcm:
            assert r["paired"]["kid"]["diff"] == pytest.approx(r["intervals"]["kid"]["value"] - lcm[r["steps"]],
                                                               abs=2e-3)
        else:
            assert "paired" not in r  # DDIM 50: no LCM row at 50 steps
    assert result["interval_settings"]["num_resamples"] == 1000
    assert "real images (floor" in table[-1]
    assert capsys.readouterr().out.strip().endswith(str(out / "results.json"))


def test_evaluate_teacher_keeps_its_interface(micro_teacher, micro_judge, tmp_path, monkeypatch):
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    monkeypatch.setattr(presets, "VAE_PSNR_COUNT", 8)
    monkeypatch.setattr(presets, "JUDGE_REAL_COUNT", 16)
    result, images = evaluate_teacher(Bundle.load(micro_teacher), JudgeExtractor.load(micro_judge), tmp_path, 2,
                                      "dpm-solver++", 2, 5.0, cache_dir=tmp_path / "cache")
    assert {"sampler", "steps", "guidance", "num_samples", "attribute_accuracy", "seconds"} <= result.keys()
    assert result["unet_evals_per_image"] == 4 and images.shape == (2, 3, 64, 64)


def test_benchmark_runs_on_micro_folders(micro_lcm, micro_teacher, capsys):
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--lcm", str(micro_lcm), "--teacher", str(micro_teacher), "--batch-size", "1",
                       "--repeats", "1", "--warmup", "0"])
    assert [r["unet_evals"] for r in rows] == [1, 2, 4, 50, 100]
    assert rows[-1]["ratio"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert "x teacher-50" in capsys.readouterr().out
