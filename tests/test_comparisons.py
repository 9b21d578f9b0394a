"""Paired comparisons of a results dict's rows (evaluation/comparisons.py) and their Table 1 columns, on
hand-made per-image values: no model, no judge."""
import numpy as np
import pytest

from latentcm.evaluation import comparisons, intervals, reports
from latentcm.evaluation import results as results_file

N, M, D = 30, 40, 5


def _values(seed: int, shift: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    named = np.where(np.arange(N) % 3 == 0, np.nan, (rng.random(N) < 0.7).astype(float))  # a third leave it open
    return {"features": (rng.normal(size=(N, D)) + shift).astype(np.float32),
            "caption_score": 100 * rng.random(N), "exact_match": (rng.random(N) < 0.5).astype(float),
            "attribute_accuracy": {"colour": (rng.random(N) < 0.9).astype(float), "position": named}}


def _record(sampler: str, steps: int, g: float, kid: float, **variant) -> dict:
    key = f"{'lcm' if sampler == 'lcm' else 'teacher'}-{sampler}-{steps}-g{g:g}" + "".join(f"-{v}" for v in variant.values())
    return {"key": key, "model": "lcm" if sampler == "lcm" else "teacher", "sampler": sampler, "steps": steps,
            "guidance": g, **variant, "fid": 10.0, "kid": kid, "kid_std": 1.0, "precision": 0.5, "recall": 0.5,
            "caption_score": 50.0, "exact_match": 0.5, "attribute_accuracy": {"colour": 0.9},
            "histogram_distance": {"size": 0.1, "position": 0.1}, "unet_evals": steps, "seconds": 1.0}


def _results(sweep: bool = False) -> tuple[dict, dict]:
    """LCM rows on two schedules (its own: refine) and DDIM, at 2 steps, g 8.5 (+ g 3 with ``sweep``); the grid
    LCM row has the very images of the refine one, DDIM images shifted away from the reference."""
    records = [_record("lcm", 2, 8.5, 5.0, schedule="grid"), _record("lcm", 2, 8.5, 5.0, schedule="refine"),
               _record("ddim", 2, 8.5, 40.0)]
    refine = _values(1)
    values = {records[0]["key"]: refine, records[1]["key"]: refine, records[2]["key"]: _values(2, shift=1.5)}
    results = {"num_samples": N, "seed": 0, "extractor": "judge", "reference": "ref.npz",
               "reference_kind": "independent", "timestep_schedules": {"lcm": "refine"}, "records": records,
               "floor": {**{k: v for k, v in _record("lcm", 1, 1, 0.0).items() if k not in ("key", "model", "sampler",
                                                                                              "steps", "guidance",
                                                                                              "unet_evals", "seconds")},
                         "num_samples": N}}
    if sweep:
        results["sweep"] = [_record("lcm", 2, 3.0, 7.0, schedule="refine"), _record("ddim", 2, 3.0, 4.0)]
        values[results["sweep"][0]["key"]] = _values(3, shift=1.0)
        values[results["sweep"][1]["key"]] = _values(4)
    return results, values


def _reference():
    return np.random.default_rng(9).normal(size=(M, D))


def test_identical_rows_pair_to_zero_and_a_shifted_row_is_resolved():
    results, values = _results()
    comparisons.attach(results, values, _reference(), baseline="lcm", num_resamples=200)
    results_file.validate_results(results)
    grid, refine, ddim = results["records"]
    assert refine["paired"]["baseline"] == refine["key"]   # the model's own schedule is the baseline
    for metric in ("kid", "fid", "caption_score", "exact_match"):
        assert grid["paired"][metric] == {"diff": 0.0, "ci": [0.0, 0.0]}
        lo, hi = grid["intervals"][metric]["ci"]
        assert lo < hi and grid["intervals"][metric] == refine["intervals"][metric]
    assert grid["paired"]["attribute_accuracy"]["position"] == {"diff": 0.0, "ci": [0.0, 0.0]}
    assert intervals.resolved(ddim["paired"]["kid"]["ci"]) and ddim["paired"]["kid"]["diff"] > 0
    assert intervals.resolved(ddim["paired"]["fid"]["ci"])
    assert results["interval_settings"]["num_resamples"] == 200


def test_mean_intervals_leave_out_images_that_do_not_name_the_attribute():
    values = np.array([1.0, np.nan, 0.0, np.nan])
    counts = np.array([[2.0, 0.0, 2.0, 0.0], [1.0, 1.0, 0.0, 2.0], [0.0, 4.0, 0.0, 0.0]])
    got = intervals.mean_resamples(values, None, counts, None)
    assert got[0] == 0.5 and got[1] == 1.0 and np.isnan(got[2])
    assert intervals.percentile_interval(got) == (pytest.approx(0.5125), pytest.approx(0.9875))
    with pytest.raises(ValueError, match="undefined on every resample"):
        intervals.percentile_interval(got[2:])


def test_fid_resamples_agree_with_the_sqrtm_fid():
    from latentcm.evaluation import metrics

    a, r = np.random.default_rng(0).normal(size=(50, 6)), np.random.default_rng(1).normal(size=(60, 6)) + 0.3
    got = intervals.fid_resamples(a, r, np.ones((1, 50)), np.ones((1, 60)))[0]
    assert got == pytest.approx(metrics.fid(a, r), rel=1e-8)


def test_table1_shows_the_paired_column_and_old_results_render_as_before():
    results, values = _results()
    plain = reports.results_markdown(results)
    assert "(subset sd " in plain and "Δ" not in plain and "Sampling intervals" not in plain
    comparisons.attach(results, values, _reference(), baseline="lcm", num_resamples=100)
    text = reports.results_markdown(results)
    head, _, *rows = text.splitlines()
    assert "Δ KID×10³ 2 vs LCM, refine timesteps" in head
    by_label = {r.split(" | ")[0].lstrip("| "): r for r in rows if r.startswith("| ")}
    assert "| baseline |" in by_label["LCM, w 7.5, refine timesteps"]
    assert "| +0.00 [+0.00, +0.00] |" in by_label["LCM, w 7.5, grid timesteps"]
    ddim = results["records"][2]["paired"]["kid"]
    assert f"**{ddim['diff']:+.2f} [{ddim['ci'][0]:+.2f}, {ddim['ci'][1]:+.2f}]**" in by_label["DDIM, g 8.5"]
    assert "Sampling intervals (95%" in text and "Δ exact acc. %" in text


def test_best_guidance_pairs_each_method_at_its_own_best_g():
    results, values = _results(sweep=True)
    comparisons.attach(results, values, _reference(), baseline="lcm", num_resamples=100)
    results_file.validate_results(results)
    best = {e["key"]: e for e in results["best_guidance"]}
    ddim = best["teacher-ddim-2-g3"]                      # DDIM's best g is 3 (KID 4 < 40) ...
    assert ddim["guidance"] == 3.0 and ddim["baseline_guidance"] == 8.5  # ... the LCM's is 8.5 (5 < 7)
    assert ddim["paired"]["baseline"] == "lcm-lcm-2-g8.5-refine" and "diff" in ddim["paired"]["kid"]
    # the sweep rows are also paired at matched g: DDIM g 3 against the LCM at g 3
    assert results["sweep"][1]["paired"]["baseline"] == "lcm-lcm-2-g3-refine"
    text = reports.results_markdown(results)
    assert "Δ KID×10³ 2 vs LCM, refine timesteps at its best g" in text


def test_a_baseline_that_is_no_row_is_refused():
    results, values = _results()
    with pytest.raises(ValueError, match="not a sampler of the table's rows"):
        comparisons.attach(results, values, _reference(), baseline="dpm-solver", num_resamples=10)
