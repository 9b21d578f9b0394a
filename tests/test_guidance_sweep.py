"""The guidance sweep (``lcm ablate guidance``, LCM Fig. 4), distillation fidelity, and the negative-prompt report
on a real-CFG LCM: micro models, a handful of images."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from latentcm import world
from latentcm.cli import main
from latentcm.evaluation import guidance_sweep, intervals, metrics, presets, references, scoring
from latentcm.evaluation.extractors import JudgeExtractor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg_lcm(micro_teacher, tmp_path_factory):
    """A micro real-CFG LCM (no w input; takes negative prompts): two distillation steps."""
    out = tmp_path_factory.mktemp("cfg-lcm") / "cfg-lcm"
    main(["distill", "--guidance-mode", "cfg", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2",
          "--batch-size", "2", "--num-data", "4", "--validate-every", "0"])
    return out


@pytest.fixture
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)


def _real(count: int, seed: int):
    samples = references.heldout_samples(count, seed)
    return world.images_array(samples), [s.text for s in samples]


def test_fidelity_of_images_to_themselves_is_zero(micro_judge):
    extractor = JudgeExtractor.load(micro_judge)
    images, prompts = _real(48, 5)
    own = scoring.reference_from_images(images, extractor, "self")
    assert own.kind == "generated" and own.name == "self" and own.features.shape[0] == 48
    assert set(own.labels) == set(references.HISTOGRAM_ATTRIBUTES) and len(own.labels["size"]) == 48
    same = scoring.score(images, prompts, extractor, own, paired=True)
    assert same["kid"] == pytest.approx(0, abs=1e-9) and same["fid"] == pytest.approx(0, abs=1e-3)
    assert all(v == 0 for v in same["histogram_distance"].values())  # the judge labels the same images alike
    # unpaired, a set's own copies bias KID far below 0: why fidelity (same prompts and noise) pairs them
    assert scoring.score(images, prompts, extractor, own)["kid"] < -10
    other = scoring.score(255 - images, prompts, extractor, own, paired=True)  # inverted colours: another set
    assert other["kid"] > 1 and other["fid"] > 1


def test_paired_kid_is_zero_for_identical_sets_and_unbiased_for_independent_ones():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    assert metrics.kid(a, a, 20, 100, paired=True)[0] == pytest.approx(0, abs=1e-12)
    assert metrics.kid(a, a.copy(), 20, 300, paired=True)[0] == pytest.approx(0, abs=1e-12)  # the gram path
    b = rng.normal(size=(300, 8))  # independent rows from the same distribution: paired or not, near 0
    assert abs(metrics.kid(a, b, 20, 300, paired=True)[0]) < 0.05 and abs(metrics.kid(a, b, 20, 300)[0]) < 0.05
    assert metrics.kid(a, b + 1.0, 20, 300, paired=True)[0] > 0.5
    with pytest.raises(ValueError, match="paired"):
        metrics.kid(a, b[:10], paired=True)
    draws = intervals.draw(300, 300, 30, reference_follows_prompts=True)
    assert np.allclose(intervals.kid_resamples(a, a, draws.prompts, draws.reference, paired=True), 0, atol=1e-9)
    full = intervals.kid_resamples(a, b, np.ones((1, 300)), np.ones((1, 300)), paired=True)[0]
    assert full == pytest.approx(metrics.kid(a, b, 1, 300, paired=True)[0])


def test_best_guidance_per_curve_and_its_distance_from_the_teacher():
    def rec(model, steps, g, kid):
        return {"model": model, "steps": steps, "guidance": g, "kid": kid}
    ode = [rec("teacher", 50, g, k) for g, k in ((1, 9.0), (2, 1.5), (3, 4.0), (8.5, 30.0))]
    lcm = [rec("a", 4, g, k) for g, k in ((1, 5.0), (2, 6.0), (3, 7.0), (8.5, 2.0))]
    lcm += [rec("a", 1, g, k) for g, k in ((1, 8.0), (2, 3.0), (3, 2.5), (8.5, 9.0))]
    best = guidance_sweep.best_guidance(lcm, ode)
    assert best[0] == {"model": "teacher", "steps": 50, "guidance": 2, "kid": 1.5}
    assert [(b["model"], b["steps"], b["guidance"], b["sweep_points_from_teacher"]) for b in best[1:]] == [
        ("a", 4, 8.5, 2), ("a", 1, 3, 1)]
    assert guidance_sweep.mean_accuracy({"colour": 0.5, "background": 1.0, "shape": 0.75, "size": 0.0}) == 0.75
    gaps = {("teacher", None): {1: [5.0, 9.0], 2: [0.0, 0.0], 3: [-1.0, 4.0], 8.5: [20.0, 40.0]},
            ("a", 4): {1: [1.0, 3.0], 2: [2.0, 6.0], 3: [0.5, 8.0], 8.5: [0.0, 0.0]},
            ("a", 1): {1: [-0.5, 9.0], 2: [-0.1, 1.0], 3: [0.0, 0.0], 8.5: [3.0, 9.0]}}
    tied = guidance_sweep.best_guidance(lcm, ode, gaps)
    assert [(b["tied"], b.get("tied_sweep_points_from_teacher")) for b in tied] == [
        ([2, 3], None), ([8.5], 1), ([1, 2, 3], 0)]
    assert tied[1]["sweep_points_from_teacher"] == 2 and tied[2]["kid_gap_ci"]["8.5"] == [3.0, 9.0]


def test_kid_gaps_are_paired_differences_to_the_best_g():
    rng = np.random.default_rng(0)
    ref = SimpleNamespace(features=rng.normal(size=(200, 8)))  # kid_gaps reads only a reference's features
    same = rng.normal(size=(120, 8))
    features = {1.0: same, 2.0: same + 0.01, 3.0: same + 1.5}
    gaps = guidance_sweep.kid_gaps(features, 1.0, ref, intervals.draw(120, 200, 50))
    assert gaps[1.0] == [0.0, 0.0]                    # the best g against itself: exactly 0 on every resample
    assert gaps[2.0][0] < 0.5 and gaps[3.0][0] > 0   # a tiny shift is tied with it, a large one resolved worse


def test_resampled_best_counts_the_winner_of_each_resample_and_the_share_near_the_teacher():
    kids = {1.0: np.array([1.0, 5.0, 5.0, 2.0]), 2.0: np.array([3.0, 1.0, 4.0, 3.0]), 3.0: np.array([2.0, 9.0, 0.0, 1.0])}
    assert guidance_sweep.resampled_best(kids).tolist() == [1.0, 2.0, 3.0, 3.0]

    def rec(model, steps, g, kid):
        return {"model": model, "steps": steps, "guidance": g, "kid": kid}
    ode = [rec("teacher", 50, g, k) for g, k in ((1, 1.0), (2, 2.0), (3, 3.0))]
    lcm = [rec("a", 4, g, k) for g, k in ((1, 3.0), (2, 2.0), (3, 1.0))]
    resampled = {("teacher", None): np.array([1.0, 1.0, 1.0, 2.0]), ("a", 4): np.array([3.0, 2.0, 3.0, 3.0])}
    best = guidance_sweep.best_guidance(lcm, ode, resampled=resampled)
    assert best[0]["best_share"] == {"1": 0.75, "2": 0.25}
    assert best[1]["best_share"] == {"2": 0.25, "3": 0.75}
    assert best[1]["within_one_point_share"] == 0.5   # (3, 1) and (3, 1) are two points apart; (2, 1), (3, 2) one
    table = guidance_sweep._best_table(best)
    assert "| a | 4 | 3 | 1.00 | 2 | 3: 75%, 2: 25% | 50% |" in table


@pytest.mark.parametrize("size", ["small", "medium", "large"])
@pytest.mark.parametrize("colour, background", [("red", "white"), ("orange", "yellow"), ("gray", "purple")])
def test_object_area_of_rendered_circles_is_their_disc(size, colour, background):
    scene = world.Scene("circle", colour, background, size, "center", 0.5, 0.5, 0.0)
    pixels = np.asarray(world.render(scene))[None]
    disc = np.pi * world.SIZES[size] ** 2   # r is a fraction of the side
    assert scoring.object_area(pixels)[0] == pytest.approx(disc, abs=0.012)


def test_following_compares_accuracy_at_g1_and_the_area_rise_with_the_ode():
    def rec(model, steps, g, background):
        return {"model": model, "steps": steps, "guidance": g,
                "attribute_accuracy": {"background": background, "shape": 0.9}}
    ode = [rec("teacher", 50, g, b) for g, b in ((1.0, 0.8), (1.5, 0.9), (8.5, 1.0))]
    lcm = [rec("a", 4, g, 1.0) for g in (1.0, 1.5, 8.5)] + [rec("a", 1, 1.5, 1.0)]
    areas = {("teacher", None, 1.5): np.full(4, 0.10), ("teacher", None, 8.5): np.array([0.12, 0.13, 0.14, 0.13]),
             ("a", 4, 1.5): np.full(4, 0.10), ("a", 4, 8.5): np.array([0.11, 0.12, 0.115, 0.115])}
    draws = intervals.draw(4, 4, 50)
    four, one = guidance_sweep.following(lcm, ode, areas, draws)
    assert (four["background"], four["ode_background"], four["shape"], four["ode_shape"]) == (1.0, 0.8, 0.9, 0.9)
    assert four["ode_area_rise"] == pytest.approx(0.03) and four["area_rise"] == pytest.approx(0.015)
    assert four["area_rise_ratio"] == pytest.approx(0.5)
    lo, hi = four["area_rise_ratio_ci"]
    assert lo < 0.5 < hi          # the per-image rises are not proportional, so resampling moves the ratio
    assert one == {"model": "a", "steps": 1}        # no g = 1 and no g = 8.5 row: nothing to compare


def test_ablate_guidance_sweeps_teacher_ode_and_lcms(micro_teacher, micro_lcm, cfg_lcm, micro_judge, tmp_path,
                                                     cached, capsys, monkeypatch):
    monkeypatch.setattr(presets, "TEACHER_STEPS", 4)  # the ODE's 50 steps are 50 x 2 UNet passes per image
    out = tmp_path / "sweep"
    main(["ablate", "guidance", "--model", str(micro_lcm), "--model", str(cfg_lcm), "--teacher", str(micro_teacher),
          "--judge", str(micro_judge), "--guidances", "1,3", "--steps", "1,2", "--num-samples", "4",
          "--resamples", "20", "--batch-size", "4", "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith(str(out / "results.json"))
    results = json.loads((out / "results.json").read_text())
    keys = [(r["model"], r["steps"], r["guidance"]) for r in results["records"]]
    assert keys == [(m, n, g) for g in (1, 3) for m in ("lcm", "cfg-lcm") for n in (1, 2)]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in results["teacher_ode"]] == [
        ("ddim-trailing", 4, 1), ("ddim-trailing", 4, 3)]
    for r in results["records"]:
        assert set(r["fidelity"]) == {"kid", "kid_std", "fid", "kid_ci"} and r["fidelity"]["fid"] >= 0
        assert r["kid_ci"][0] <= r["kid_ci"][1] and 0 <= r["accuracy"] <= 1
    for model, n in [(m, n) for m in ("lcm", "cfg-lcm") for n in (1, 2)]:  # the best g: the curve's lowest KID
        curve = [r for r in results["records"] if r["model"] == model and r["steps"] == n]
        found = next(b for b in results["best"] if b["model"] == model and b["steps"] == n)
        assert found["guidance"] == min(curve, key=lambda r: r["kid"])["guidance"]
        assert found["guidance"] in found["tied"] and found["kid_gap_ci"][f"{found['guidance']:g}"] == [0.0, 0.0]
        assert sum(found["best_share"].values()) == pytest.approx(1, abs=1e-3)
        assert 0 <= found["within_one_point_share"] <= 1  # two g: always within one point
    table = (out / "results.md").read_text()
    assert "## cfg-lcm, 2 steps" in table and "| 3 (2) |" in table and "## Best g" in table and "g tied with" in table
    assert (out / "tradeoff.png").stat().st_size > 0 and (out / "fidelity.png").stat().st_size > 0
    samples = sorted(p.name for p in (out / "samples").iterdir())
    before = {p: (out / "samples" / p).stat().st_mtime_ns for p in samples}
    main(["ablate", "guidance", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--judge", str(micro_judge),
          "--omegas", "0", "--steps", "1", "--num-samples", "4", "--resamples", "0", "--out", str(out)])
    again = json.loads((out / "results.json").read_text())  # --omegas: g = w + 1; cached samples reused
    assert [(r["guidance"], r["omega"]) for r in again["records"]] == [(1, 0)] and "kid_ci" not in again["records"][0]
    assert {p: (out / "samples" / p).stat().st_mtime_ns for p in samples} == before


@pytest.mark.parametrize("argv, words", [
    (["--guidances", "1,2", "--omegas", "1"], "not both"),
    (["--guidances", "2,nan"], "--guidances"),
    (["--guidances", ","], "--guidances"),
])
def test_ablate_guidance_refuses_bad_guidances(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "guidance", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and words in err


def test_ablate_guidance_refuses_a_teacher_as_model(micro_teacher, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "guidance", "--model", str(micro_teacher), "--teacher", str(micro_teacher)])
    assert exc.value.code == 2 and "not an LCM" in capsys.readouterr().err


def _report_script():
    spec = importlib.util.spec_from_file_location("negative_prompt_report",
                                                  ROOT / "scripts" / "negative_prompt_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_negative_prompt_report_on_a_cfg_lcm(cfg_lcm, micro_lcm, micro_judge, tmp_path, capsys):
    report = _report_script()
    out = tmp_path / "negative"
    report.main(["--model", str(cfg_lcm), "--model", str(micro_lcm), "--steps", "2", "--num-samples", "4",
                 "--judge", str(micro_judge), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    measured, refused = results["models"]
    assert measured["model"] == "cfg-lcm" and measured["steps"] == 2 and measured["sampler"] == "lcm"
    assert measured["guidance"] == 2.0  # the real-CFG LCM's own default g
    shares = measured["summary"]
    assert 0 <= shares["without"]["value"] <= 1 and 0 <= shares["with"]["value"] <= 1
    assert set(measured["per_colour"]) == set(report.NEGATED)
    assert refused["model"] == "lcm" and "negative" in refused["refused"] and "summary" not in refused
    text = (out / "README.md").read_text()
    assert "## cfg-lcm" in text and "Not measured" in text and f"--model {cfg_lcm} --sampler lcm --steps 2" in text
    assert (out / "grid-cfg-lcm.png").is_file() and not (out / "grid-lcm.png").exists()
    with pytest.raises(SystemExit, match="once per --model"):
        report.main(["--model", str(cfg_lcm), "--model", str(micro_lcm), "--model", str(cfg_lcm),
                     "--steps", "1", "--steps", "2", "--judge", str(micro_judge), "--out", str(out)])
