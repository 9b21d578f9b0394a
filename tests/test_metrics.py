"""Small-sample metrics: KID, bootstrap intervals, precision/recall, label histograms, closed-form FD."""
import time

import numpy as np
import pytest

from latentcm.evaluation import metrics


def _gauss(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _naive_mmd2(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, by double loops over rows (sizes may differ)."""
    d = len(x[0])

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


# ---- KID ----

def test_kid_matches_a_double_loop_reference_when_the_subset_is_everything():
    a, b = _gauss(6, 3, 0), _gauss(6, 3, 1, shift=0.7)
    mean, std = metrics.kid(a, b, num_subsets=1, subset_size=6)
    assert mean == pytest.approx(_naive_mmd2(a.tolist(), b.tolist()), rel=1e-10)
    # every subset is a permutation of all rows: the same value each time
    mean, std = metrics.kid(a, b, num_subsets=5)
    assert mean == pytest.approx(_naive_mmd2(a.tolist(), b.tolist()), rel=1e-10) and std < 1e-12
    # and the Gram-matrix path agrees with it
    idx = np.arange(6)[None]
    assert metrics._kid_from_gram(a, b, idx, idx)[0] == pytest.approx(mean, rel=1e-10)


def test_kid_of_6_vs_7_points_uses_random_6_point_subsets_of_the_larger_set():
    a, b = _gauss(6, 3, 2), _gauss(7, 3, 3, shift=0.5)
    leave_one_out = [_naive_mmd2(a.tolist(), np.delete(b, j, axis=0).tolist()) for j in range(7)]
    seen = set()
    for seed in range(12):
        value, _ = metrics.kid(a, b, num_subsets=1, seed=seed)
        hits = [j for j, ref in enumerate(leave_one_out) if ref == pytest.approx(value, rel=1e-10)]
        assert len(hits) == 1, (value, leave_one_out)
        seen.add(hits[0])
    assert len(seen) > 1  # the dropped row varies with the seed


def test_kid_gram_path_equals_the_per_subset_path(monkeypatch):
    a, b = _gauss(200, 16, 4), _gauss(200, 16, 5, shift=0.2)
    gram = metrics.kid(a, b, num_subsets=50, subset_size=150, seed=3)
    monkeypatch.setattr(metrics, "_KID_GRAM_MAX", 0)  # forces one kernel per subset
    loop = metrics.kid(a, b, num_subsets=50, subset_size=150, seed=3)
    assert gram == pytest.approx(loop, rel=1e-9)
    assert gram != metrics.kid(a, b, num_subsets=50, subset_size=150, seed=4)


def test_kid_of_identical_sets_is_the_small_self_pair_term():
    a = _gauss(500, 16, 6)
    mean, std = metrics.kid(a, a, num_subsets=3, subset_size=500)
    # with a == b and every row used: 2 (mean_{i != j} k(a_i, a_j) - mean_i k(a_i, a_i)) / n
    k = (a @ a.T / 16 + 1.0) ** 3
    off = (k.sum() - np.trace(k)) / (500 * 499)
    assert mean == pytest.approx(2.0 * (off - np.trace(k) / 500) / 500, rel=1e-9) and std < 1e-12
    assert abs(mean) < 0.2 * metrics.kid(a, a + 0.25)[0]  # O(1/n): small beside a real shift


def test_kid_of_two_draws_of_one_gaussian_is_zero_within_its_spread_and_fast():
    a, b = _gauss(2000, 256, 7), _gauss(2000, 256, 8)
    start = time.perf_counter()
    mean, std = metrics.kid(a, b)  # 100 subsets of 1000
    assert time.perf_counter() - start < 5.0  # ~0.5 s on one core; a per-subset loop takes ~10x that
    assert std > 0 and abs(mean) < 3 * std, (mean, std)


def test_kid_grows_with_the_shift():
    a = _gauss(1000, 16, 9)
    values = [metrics.kid(a, _gauss(1000, 16, 10, shift=s), num_subsets=20, subset_size=500)
              for s in (0.2, 0.4, 0.8)]
    assert all(mean > 5 * std for mean, std in values), values
    means = [m for m, _ in values]
    assert means[0] < means[1] < means[2], means


def test_kid_is_unbiased_at_tiny_sample_sizes_where_fid_is_not():
    rng = np.random.default_rng(11)
    kids, fids = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
        kids.append(metrics.kid(x, y, num_subsets=1)[0])
        fids.append(metrics.fid(x, y))
    kids, fids = np.array(kids), np.array(fids)
    se_kid, se_fid = kids.std() / np.sqrt(len(kids)), fids.std() / np.sqrt(len(fids))
    assert abs(kids.mean()) < 3 * se_kid, (kids.mean(), se_kid)
    assert kids.min() < 0 < kids.max()  # single KID values scatter on both sides of 0
    assert fids.mean() > 10 * se_fid, (fids.mean(), se_fid)  # FID: positive bias, ~1 here


def test_kid_rejects_bad_inputs():
    with pytest.raises(ValueError):
        metrics.kid(_gauss(10, 3, 0), _gauss(10, 4, 1))
    with pytest.raises(ValueError):
        metrics.kid(_gauss(10, 3, 0), _gauss(10, 3, 1), subset_size=1)


# ---- Frechet distance ----

_MU1, _MU2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 0.0, -1.0, 2.0])
_S1, _S2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 1.0])


def _closed_form_fd(mu1, s1, mu2, s2):
    """FD of N(mu1, diag s1) and N(mu2, diag s2): |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    return float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2.0 * np.sqrt(s1 * s2)).sum())


def test_frechet_distance_matches_the_diagonal_closed_form():
    expected = 0.25 + 1.0 + (3.0 - 2 * np.sqrt(2.0)) + (5.0 - 4.0) + 0.0 + (10.0 - 6.0)
    assert _closed_form_fd(_MU1, _S1, _MU2, _S2) == pytest.approx(expected)
    assert metrics.frechet_distance(_MU1, np.diag(_S1), _MU2, np.diag(_S2)) == pytest.approx(expected, rel=1e-9)
    # a common rotation of both Gaussians leaves the distance alone (full covariances)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    rotated = metrics.frechet_distance(q @ _MU1, q @ np.diag(_S1) @ q.T, q @ _MU2, q @ np.diag(_S2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_fid_of_large_samples_approaches_the_closed_form():
    rng = np.random.default_rng(12)
    n = 200_000
    x = _MU1 + np.sqrt(_S1) * rng.normal(size=(n, 4))
    y = _MU2 + np.sqrt(_S2) * rng.normal(size=(n, 4))
    assert metrics.fid(x, y) == pytest.approx(_closed_form_fd(_MU1, _S1, _MU2, _S2), rel=0.01)


# ---- precision / recall ----

def test_precision_recall_of_identical_sets_is_one_one():
    a = _gauss(300, 8, 13)
    assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero_zero():
    assert metrics.precision_recall(_gauss(200, 8, 14), _gauss(200, 8, 15, shift=1000.0)) == (0.0, 0.0)


def test_precision_recall_hand_case_in_one_dimension():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # 1-NN radius 1 each: the manifold is [-1, 4]
    fake = np.array([[0.5], [10.0]])  # each the other's 1-NN: radius 9.5, covering every real point
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_a_fake_set_covering_half_the_modes_has_full_precision_and_half_recall():
    rng = np.random.default_rng(16)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    real = np.concatenate([c + rng.normal(size=(250, 2)) for c in centres])
    fake = np.concatenate([c + rng.normal(size=(250, 2)) for c in centres[:2]])
    precision, recall = metrics.precision_recall(real, fake)
    assert precision > 0.9, precision
    assert 0.45 < recall <= 0.5, recall  # the two missed modes lie ~100 away from any fake ball


def test_precision_recall_blocks_do_not_change_the_answer(monkeypatch):
    real, fake = _gauss(400, 8, 17), _gauss(300, 8, 18, shift=0.3)
    whole = metrics.precision_recall(real, fake, k=5)
    monkeypatch.setattr(metrics, "_DIST_BLOCK", 1000)  # 2-3 rows per block
    assert metrics.precision_recall(real, fake, k=5) == whole
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


def test_precision_recall_radius_excludes_the_point_itself():
    real = np.array([[0.0], [0.0], [5.0]])  # a duplicate: 1-NN radius 0 for both copies, 5 for the last
    assert metrics._knn_radii_sq(real, 1).tolist() == [0.0, 0.0, 25.0]
    with pytest.raises(ValueError):
        metrics.precision_recall(real, real, k=3)


# ---- bootstrap ----

def test_bootstrap_ci_contains_the_point_estimate_and_narrows_with_more_samples():
    widths = []
    for n in (200, 2000):
        a, b = _gauss(n, 4, 19), _gauss(n, 4, 20, shift=0.5)
        point, lower, upper = metrics.bootstrap_ci(a, b, metrics.fid)
        assert point == metrics.fid(a, b)
        assert lower < point < upper, (lower, point, upper)
        widths.append(upper - lower)
    assert widths[1] < 0.5 * widths[0], widths  # ~1/sqrt(n): 10x the rows, ~3x narrower


def test_bootstrap_ci_of_kid_contains_the_point_estimate():
    a, b = _gauss(200, 4, 21), _gauss(200, 4, 22, shift=0.5)
    point, lower, upper = metrics.bootstrap_ci(a, b, lambda x, y: metrics.kid(x, y, num_subsets=1)[0],
                                               num_resamples=100)
    assert lower < point < upper, (lower, point, upper)


def test_bootstrap_ci_is_deterministic_for_a_seed():
    a, b = _gauss(100, 4, 23), _gauss(120, 4, 24, shift=0.3)
    first = metrics.bootstrap_ci(a, b, metrics.fid, num_resamples=50, seed=1)
    assert metrics.bootstrap_ci(a, b, metrics.fid, num_resamples=50, seed=1) == first
    assert metrics.bootstrap_ci(a, b, metrics.fid, num_resamples=50, seed=2) != first


def test_fid_bootstrap_is_biased_upwards_by_duplicates():
    a, b = _gauss(200, 4, 25), _gauss(200, 4, 26)  # one distribution: FID's bias dominates it
    point, lower, upper = metrics.bootstrap_ci(a, b, metrics.fid, alpha=0.5)
    assert point < lower < upper, (point, lower, upper)  # even the interquartile range lies above


# ---- label histograms ----

def test_histogram_is_frequencies_in_category_order():
    freqs = metrics.histogram(["big", "small", "big", "big"], ["small", "big", "medium"])
    assert freqs.tolist() == [0.25, 0.75, 0.0]
    with pytest.raises(ValueError):
        metrics.histogram(["huge"], ["small", "big"])
    with pytest.raises(ValueError):
        metrics.histogram([], ["small", "big"])


def test_histogram_distance_is_total_variation():
    cats = ["left", "centre", "right"]
    assert metrics.histogram_distance(["left", "right", "centre"], ["centre", "left", "right"], cats) == 0.0
    assert metrics.histogram_distance(["left", "left"], ["right", "centre"], cats) == 1.0
    # (1/2, 1/2, 0) vs (1/4, 1/4, 1/2): 0.5 * (1/4 + 1/4 + 1/2) = 1/2
    a, b = ["left", "centre"], ["left", "centre", "right", "right"]
    assert metrics.histogram_distance(a, b, cats) == pytest.approx(0.5)
    # (2/3, 1/3, 0) vs (0, 1/3, 2/3): 2/3
    a, b = ["left", "left", "centre"], ["centre", "right", "right"]
    assert metrics.histogram_distance(a, b, cats) == pytest.approx(2 / 3)


def test_kid_text_prints_an_interval_or_names_the_subset_spread():
    from latentcm.evaluation.scoring import kid_text

    # a sampling interval: the full-set value and its 95% interval
    table1 = {"kid": 9.0, "kid_std": 1.0, "intervals": {"kid": {"value": 2.0, "ci": [1.0, 3.5]}}}
    assert kid_text(table1) == "2.00 [1.00, 3.50]"
    assert kid_text({"kid": 1.25, "kid_std": 0.5, "kid_ci": [-0.5, 3.0]}, 1) == "1.2 [-0.5, 3.0]"
    # none: the spread over reference subsets alone, named, never a "±"
    assert kid_text({"kid": 1.234, "kid_std": 0.5}) == "1.23 (subset sd 0.50)"
