import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from latentcm import registry, world
from latentcm.cli import main
from latentcm.evaluation import generation, metrics, pipeline, presets, references, reports
from latentcm.evaluation import results as results_file
from latentcm.evaluation.extractors import HFClipScorer, InceptionExtractor, JudgeExtractor, wanted_indices


def _features(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def test_fid_is_zero_on_itself_symmetric_and_grows_with_noise():
    a, b = _features(seed=0), _features(seed=1)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-6)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=a.shape)
    values = [metrics.fid(a, a + s * noise) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(values, values[1:])), values


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 for diagonal covariances
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(1.0 + 1.0 + 1.0)


def test_fid_survives_fewer_samples_than_dimensions():
    a, b = _features(n=20, d=64, seed=3), _features(n=20, d=64, seed=4)
    assert np.isfinite(metrics.fid(a, b)) and metrics.fid(a, b) > 0


def test_clip_score_prefers_matched_pairs():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(64, 32))
    image = text + 0.3 * rng.normal(size=text.shape)
    assert metrics.clip_score(image, text) > 80 > 20 > metrics.clip_score(image, np.roll(text, 1, axis=0))


def test_judge_caption_score_separates_matched_from_shuffled_captions():
    extractor = JudgeExtractor.load(registry.resolve("judge"))
    samples = list(world.iter_samples(3, 96, "heldout"))
    images = torch.from_numpy(world.images_array(samples)).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [s.text for s in samples]
    probs = extractor.probabilities(images)
    matched = metrics.attribute_agreement(probs, wanted_indices(captions))
    shuffled = metrics.attribute_agreement(probs, wanted_indices(captions[1:] + captions[:1]))
    assert matched > 90 and shuffled < 50, (matched, shuffled)
    predicted = extractor.predict(images)
    wanted = [world.parse_caption(c) for c in captions]
    assert metrics.exact_accuracy(predicted, wanted) > 0.9
    assert metrics.exact_accuracy(predicted, wanted[1:] + wanted[:1]) < 0.2


def test_hf_clip_scorer_on_a_tiny_random_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from latentcm.models.components import build_tokenizer

    tok = build_tokenizer(16)
    cfg = CLIPConfig(text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    scorer = HFClipScorer(tmp_path / "clip")
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    img, txt = scorer.image_embeds(images), scorer.text_embeds(["a red circle", "blue square", "star"])
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    assert 0 <= metrics.clip_score(img, txt) <= 100
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        HFClipScorer(tmp_path / "missing")


def test_inception_backend_loads_or_says_why_not():
    try:
        import torchvision  # noqa: F401
        available = True
    except Exception:
        available = False
    if available:  # a machine with torchvision and torchmetrics: real 2048-d features
        pytest.importorskip("torchmetrics")
        assert InceptionExtractor().features(torch.zeros(2, 3, 64, 64)).shape == (2, 2048)
    else:  # this machine's CPU torch build: a clear ImportError
        with pytest.raises(ImportError, match="Inception FID needs"):
            InceptionExtractor()


def test_reference_stats_are_cached_per_judge_version(micro_judge, tmp_path):
    extractor = JudgeExtractor.load(micro_judge)
    ref = references.reference_set(extractor, count=40, cache_dir=tmp_path)
    mu, sigma, path = ref.mu, ref.sigma, ref.path
    assert extractor.version in path.name and path.is_file() and mu.shape == (256,) and sigma.shape == (256, 256)
    assert ref.features.shape == (40, 256) and {len(v) for v in ref.labels.values()} == {40}
    extractor.features = None  # a second call must not recompute
    again = references.reference_set(extractor, count=40, cache_dir=tmp_path)
    np.testing.assert_array_equal(mu, again.mu)
    np.testing.assert_array_equal(ref.features, again.features)
    assert {k: list(v) for k, v in again.labels.items()} == {k: list(v) for k, v in ref.labels.items()}


def test_evaluate_cli_writes_valid_results_and_reuses_cached_samples(micro_lcm, micro_teacher, micro_judge,
                                                                      tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
            "--steps", "1,2", "--num-samples", "6", "--batch-size", "4", "--out", str(out)]
    main([*args, "--samplers", "lcm,ddim"])
    results = json.loads((out / "results.json").read_text())
    results_file.validate_results(results)
    assert [(r["sampler"], r["steps"]) for r in results["records"]] == [("lcm", 1), ("lcm", 2), ("ddim", 1), ("ddim", 2)]
    assert [r["unet_evals"] for r in results["records"]] == [1, 2, 2, 4]  # counted: the teacher's CFG costs two
    table = (out / "table1.md").read_text()
    assert "| LCM, w 7.5 |" in table and "| DDIM, g 7.5 |" in table and (out / "table1.png").is_file()
    assert (out / "grids" / "lcm-lcm-2-g8.5.png").is_file()
    cached = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    main([*args, "--samplers", "lcm,ddim,dpm-solver++"])
    again = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    assert {k: again[k] for k in cached} == cached and len(again) == len(cached) + 2
    rerun = json.loads((out / "results.json").read_text())["records"]
    # the same scores from the cached samples (KID's last rounded digit may flip: BLAS sums in another order)
    sampled = ("intervals", "paired")  # resamples of the judge's features: their float noise, times a percentile
    assert _close([{k: v for k, v in r.items() if k not in sampled} for r in rerun[:4]],
                  [{k: v for k, v in r.items() if k not in sampled} for r in results["records"]])
    got, want = (json.dumps([[r[k] for k in sampled] for r in rows], sort_keys=True) for rows in (rerun[:4], results["records"]))
    numbers = re.compile(r"-?\d+\.?\d*(?:e-?\d+)?")
    assert numbers.sub("#", got) == numbers.sub("#", want)  # the same keys and baselines
    assert [float(x) for x in numbers.findall(got)] == pytest.approx([float(x) for x in numbers.findall(want)],
                                                                     rel=1e-3, abs=1e-2)
    bad = {**results, "records": [{**results["records"][0], "fid": -1.0}]}
    with pytest.raises(jsonschema.ValidationError):
        results_file.validate_results(bad)


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0,2"], "--steps must be integers in 1..1000"),
    (["--samplers", "lcm,euler"], "unknown euler"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(micro_lcm, args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(micro_lcm), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and needle in err


def test_evaluate_refuses_the_lcm_sampler_on_a_teacher(micro_teacher, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(micro_teacher), "--samplers", "lcm,ddim"])
    assert exc.value.code == 2 and "drop 'lcm'" in capsys.readouterr().err


def test_ablate_solver_skip_probes_fid_over_iterations_and_resumes(micro_teacher, micro_judge, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    monkeypatch.setattr(presets, "TEACHER_STEPS", 2)  # the ODE reference
    out = tmp_path / "ablate"
    args = ["ablate", "solver-skip", "--teacher", str(micro_teacher), "--judge", str(micro_judge),
            "--solvers", "ddim,dpm-solver++", "--skips", "20,50", "--iterations", "2", "--eval-every", "1",
            "--num-samples", "4", "--batch-size", "2", "--num-data", "4", "--resamples", "10", "--out", str(out)]
    main(args)
    results = json.loads((out / "results.json").read_text())
    keys = [(r["solver"], r["skip"], r["iteration"]) for r in results["records"]]
    assert keys == [(s, k, i) for s in ("ddim", "dpm-solver++") for k in (20, 50) for i in (0, 1, 2)]
    at0 = [r for r in results["records"] if r["iteration"] == 0]  # the untrained student is the teacher
    assert all(r["kid"] == at0[0]["kid"] for r in at0 if r["skip"] == at0[0]["skip"])
    assert all(r["fid"] >= 0 and 0 <= r["caption_score"] <= 100 for r in results["records"])
    table = (out / "results.md").read_text()
    assert "| ddim-k50 |" in table and "fid. KID @0" in table and "KID @2" in table and (out / "solver-skip.png").is_file()
    assert f"KID×10³ to real of real images (floor): {results['floor']['kid']:.2f}" in table
    log = out / "runs" / "ddim-k20" / "probe.jsonl"
    before = log.read_text()
    main(args)  # finished runs are not trained again
    assert log.read_text() == before
    i = args.index("--solvers")
    main(args[:i] + ["--pairs", "dpm-solver++:50,ddim:20"] + args[i + 4:])  # a subset first, then OUT's other runs
    names = json.loads((out / "results.json").read_text())["runs"]
    assert names == ["dpm-solver++-k50", "ddim-k20", "ddim-k50", "dpm-solver++-k20"] and log.read_text() == before


@pytest.mark.parametrize("pairs", ["ddim", "ddim:0", "euler:20", "ddim:20:1", ","])
def test_ablate_solver_skip_refuses_bad_pairs(pairs, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "solver-skip", "--pairs", pairs])
    assert exc.value.code == 2 and "--pairs" in capsys.readouterr().err


def test_ablate_guidance_records_omega(micro_lcm, micro_teacher, micro_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "TEACHER_STEPS", 2)  # the teacher ODE beside the LCM: a short one
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "guidance"
    main(["ablate", "guidance", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
          "--omegas", "2,8", "--steps", "1,2", "--num-samples", "4", "--resamples", "0", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())["records"]
    assert [(r["omega"], r["steps"]) for r in records] == [(2, 1), (2, 2), (8, 1), (8, 2)]
    assert [r["guidance"] for r in records] == [3, 3, 9, 9]
    assert "| 9 (8) |" in (out / "results.md").read_text() and (out / "tradeoff.png").is_file()


def test_sample_cache_notices_new_weights_in_the_same_folder(micro_lcm, tmp_path):
    import os
    import shutil

    from latentcm.bundle import Bundle

    model = shutil.copytree(micro_lcm, tmp_path / "lcm")
    row, prompts = pipeline.Row("m", "lcm", 1, 8.5), ["a red circle on a blue background"] * 2
    first, _ = generation.generate_cached(Bundle.load(model), row, prompts, 0, tmp_path / "samples")
    again, _ = generation.generate_cached(Bundle.load(model), row, prompts, 0, tmp_path / "samples")
    assert np.array_equal(first, again)
    retrained = Bundle.load(model)
    with torch.no_grad():
        for p in retrained.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    retrained.unet.save_pretrained(model / "unet")  # a new run exported into the same folder
    weights = next((model / "unet").glob("*.safetensors"))
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 5))
    fresh, _ = generation.generate_cached(Bundle.load(model), row, prompts, 0, tmp_path / "samples")
    assert not np.array_equal(first, fresh)


def test_style_judge_trains_on_vae_round_trips_and_reports_both_ceilings(micro_teacher, tmp_path):
    from latentcm.evaluation import style
    from latentcm.images import vae_round_trip
    from latentcm.bundle import Bundle

    vae = Bundle.load(micro_teacher).vae
    x, labels = style.labelled_images(3, seed=0, split="heldout")
    assert x.shape == (6, 3, 64, 64) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    rt = vae_round_trip(vae, x, batch_size=4)
    assert rt.shape == x.shape and not torch.equal(rt, x) and rt.abs().max() <= 1
    judge, tag = style.load_or_train(tmp_path, steps=2, vae=vae, vae_tag="abc", count=4)
    assert tag.endswith("-vae-abc") and (tmp_path / f"{tag}.safetensors").is_file()
    plain_judge, plain_tag = style.load_or_train(tmp_path, steps=2, count=4)
    assert plain_tag != tag and plain_tag.endswith("-vae-none")
    acc = style.heldout_accuracy(judge, count=4, vae=vae)
    assert set(acc) == {"real_accuracy", "real_striped_recall", "vae_round_trip_accuracy",
                        "vae_round_trip_striped_recall"} and all(0 <= v <= 1 for v in acc.values())


def _close(a, b, rel: float = 1e-5) -> bool:
    """Equal structures, floats equal up to ``rel``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-4)
    return a == b


def test_evaluate_ceiling_row_and_guidance_sweep(micro_lcm, micro_teacher, micro_judge, tmp_path, monkeypatch):
    """--ceiling scores the teacher's guided ODE from t = 999 (DDIM trailing, 50 steps) at the LCM's g;
    --sweep-guidance scores every row again at each g and picks each method's best (lowest KID)."""
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    out = tmp_path / "eval"
    main(["evaluate", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
          "--samplers", "lcm,ddim-trailing", "--steps", "1", "--lcm-steps", "1,2", "--num-samples", "6",
          "--batch-size", "6",
          "--guidance", "4", "--ceiling", "--sweep-guidance", "2,4", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    results_file.validate_results(results)
    top = results["ceiling"]
    assert (top["sampler"], top["steps"], top["guidance"], top["unet_evals"]) == ("ddim-trailing", 50, 4.0, 100)
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in results["records"]] == [
        ("lcm", 1, 4.0), ("lcm", 2, 4.0), ("ddim-trailing", 1, 4.0)]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in results["sweep"]] == [
        ("lcm", 1, 2.0), ("lcm", 2, 2.0), ("ddim-trailing", 1, 2.0)]
    table = (out / "table1.md").read_text()
    assert "| LCM, w 3 |" in table and "| DDIM trailing, g 4 |" in table
    assert "*ceiling: DDIM trailing, 50 steps, g 4*" in table and "best guidance" in table


def test_best_guidance_table_picks_the_lowest_kid_per_method_and_steps():
    def rec(sampler, steps, g, kid):
        return {"sampler": sampler, "steps": steps, "guidance": g, "kid": kid, "kid_std": 1.0, "fid": 10 * kid}
    records = [rec("ddim", 1, 3.0, 50.0), rec("ddim", 1, 8.5, 40.0), rec("ddim", 2, 3.0, 20.0),
               rec("ddim", 2, 8.5, 30.0), rec("lcm", 1, 8.5, 5.0)]
    table = reports.best_guidance_markdown(records)
    assert "| DDIM (g 3, 8.5) | 40.00 (subset sd 1.00) (8.5) | 20.00 (subset sd 1.00) (3) | 400.00 | 200.00 |" in table
    assert "| LCM (g 8.5) | 5.00 (subset sd 1.00) (8.5) | - | 50.00 | - |" in table
