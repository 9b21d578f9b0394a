"""Sampling intervals and paired differences (evaluation/intervals.py) against hand-computed cases."""
import numpy as np
import pytest

from latentcm.evaluation import intervals, metrics


def _feats(seed, n=40, d=6, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_identical_rows_differ_by_exactly_zero():
    a, ref = _feats(0), _feats(1, n=50)
    draws = intervals.draw(40, 50, num_resamples=50, seed=3)
    for stat, rows, reference in (("kid", {"a": a, "b": a.copy()}, ref), ("fid", {"a": a, "b": a.copy()}, ref),
                                  ("mean", {"a": a[:, 0], "b": a[:, 0].copy()}, None)):
        out = intervals.intervals(rows, reference, stat, draws, baseline="a")
        assert out["b"]["diff"] == 0.0 and out["b"]["diff_ci"] == [0.0, 0.0]
        assert out["b"]["ci"] == out["a"]["ci"] and out["a"]["ci"][0] < out["a"]["ci"][1]
        assert not intervals.resolved(out["b"]["diff_ci"])


def test_unit_counts_give_the_full_set_unbiased_kid():
    a, b = _feats(0, n=30), _feats(1, n=30, shift=0.3)
    ones = np.ones((1, 30))
    assert intervals.kid_resamples(a, b, ones, ones)[0] == pytest.approx(metrics._mmd2_unbiased(a, b), rel=1e-10)


def test_weighted_kid_by_hand():
    """Counts (2, 0, 1) on a 3-row set against a 2-row reference, every term written out."""
    a, r = _feats(4, n=3, d=2), _feats(5, n=2, d=2)
    k = lambda x, y: (x @ y / 2 + 1) ** 3  # noqa: E731
    # within a: pairs (i != j) among draws {a0, a0, a2} leaving out a0 with its own copy: 2 * (2 * 1) k(a0, a2)
    within_a = 4 * k(a[0], a[2]) / (3 ** 2 - (2 ** 2 + 1))
    within_r = (k(r[0], r[1]) * 2) / (2 ** 2 - 2)
    cross = (2 * (k(a[0], r[0]) + k(a[0], r[1])) + (k(a[2], r[0]) + k(a[2], r[1]))) / (3 * 2)
    got = intervals.kid_resamples(a, r, np.array([[2.0, 0.0, 1.0]]), np.ones((1, 2)))[0]
    assert got == pytest.approx(within_a + within_r - 2 * cross, rel=1e-12)


def test_weighted_fid_equals_fid_of_the_repeated_rows():
    a, r = _feats(6, n=25), _feats(7, n=30)
    counts = np.random.default_rng(0).multinomial(25, np.full(25, 1 / 25))
    expanded = np.repeat(a, counts, axis=0)
    got = intervals.fid_resamples(a, r, counts[None].astype(float), np.ones((1, 30)))[0]
    assert got == pytest.approx(metrics.fid(expanded, r), rel=1e-6)


def test_interval_of_a_known_distribution():
    """The bootstrap interval of a mean of 400 Bernoulli(0.5) draws is close to the normal one, +-1.96 sd."""
    values = np.random.default_rng(1).integers(0, 2, 400).astype(float)
    out = intervals.intervals({"x": values}, None, "mean", intervals.draw(400, 1, num_resamples=4000, seed=2))
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / 400)
    lo, hi = out["x"]["ci"]
    assert lo == pytest.approx(values.mean() - half, abs=0.01) and hi == pytest.approx(values.mean() + half, abs=0.01)


def test_a_real_difference_is_resolved_and_shared_noise_cancels():
    """Row b = row a plus a shift: the paired interval excludes 0 and is narrower than either row's own."""
    ref = _feats(8, n=60)
    a = _feats(9, n=60)
    b = a + 0.8
    out = intervals.intervals({"a": a, "b": b}, ref, "fid", intervals.draw(60, 60, num_resamples=100, seed=0),
                              baseline="a")
    assert intervals.resolved(out["b"]["diff_ci"]) and out["b"]["diff"] > 0
    assert np.diff(out["b"]["diff_ci"])[0] < np.diff(out["b"]["ci"])[0]


def test_prompt_paired_reference_moves_with_the_prompts():
    d = intervals.draw(20, 20, num_resamples=5, seed=0, reference_follows_prompts=True)
    assert (d.prompts == d.reference).all() and (d.prompts.sum(1) == 20).all()
    with pytest.raises(ValueError, match="one image per prompt"):
        intervals.draw(20, 30, reference_follows_prompts=True)


def test_rows_must_share_prompts():
    with pytest.raises(ValueError, match="must share prompts"):
        intervals.intervals({"a": np.zeros(5)}, None, "mean", intervals.draw(6, 1, num_resamples=2))
