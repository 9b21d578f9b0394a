"""scripts/noise_background_probe.py: its cross-validated logistic score and AUC find a planted feature and no other."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import noise_background_probe as probe  # noqa: E402


def test_auc_orders_scores():
    y = np.array([0, 0, 1, 1.0])
    assert probe.auc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert probe.auc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert probe.auc(np.zeros(4), y) == 0.5


def test_out_of_fold_score_finds_a_threshold_of_one_feature():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 3))
    y = (x[:, 1] > 0.8).astype(float)  # off where one feature passes a threshold
    assert probe.auc(probe.out_of_fold(x, y), y) > 0.95
    noise = (rng.random(400) < 0.2).astype(float)  # off at random: nothing to find
    assert 0.35 < probe.auc(probe.out_of_fold(x, noise), noise) < 0.65


def test_rate_is_a_share_in_points_with_its_interval():
    r = probe.rate(np.array([1, 1, 1] + [0] * 7, dtype=float), np.random.default_rng(0))
    assert r["rate"] == pytest.approx(30.0) and r["n"] == 10
    assert r["ci"][0] < 30.0 < r["ci"][1]
