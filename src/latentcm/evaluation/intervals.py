"""Sampling intervals and paired comparisons for set metrics (KID, FID) and per-image scores.

A metric row is a set of N generated images, one per (prompt, seed); rows of one evaluation share the
prompts and seeds, so image i of every row answers the same prompt from the same noise. The percentile
bootstrap (Efron & Tibshirani 1993) here resamples the *prompts* -- one draw of N indices, with
replacement, applied to every row at once -- jointly with the reference set:

* an independent reference (its own images, no link to the prompts) is resampled on its own, with one
  draw per resample shared by every row;
* a prompt-scenes reference (image i is the real scene of prompt i) is resampled with the prompts'
  indices, so the pairs stay together.

A row's interval is the 2.5 / 97.5 percentiles of its statistic over the resamples; a *paired* difference
to a baseline row is the statistic's difference on the same resample, so what the rows share (prompts,
seeds, reference) cancels and only their difference is left to vary. Two identical rows differ by exactly
0 with a zero-width interval.

Resampling repeats rows. The statistics are computed with multiplicity weights c_i (how often row i was
drawn) and leave out the pairs of a row with its own copies, so repetition does not bias them upwards:

    KID (unbiased MMD^2, cubic kernel k):  sum_{i != j} c_i c_j k(a_i, a_j) / (N^2 - sum c_i^2)  (a within-set
    term per set)  - 2 sum_{i, j} c_i d_j k(a_i, b_j) / (N M);  with c = 1 it is the full-set unbiased MMD^2.
    FID: the Frechet distance of the weighted means and covariances.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


ALPHA = 0.05          # two-sided 95% percentile intervals
NUM_RESAMPLES = 200


@dataclass(frozen=True)
class Draws:
    """Multiplicities of one bootstrap: ``prompts`` [P, N] (shared by every row), ``reference`` [P, M]."""

    prompts: np.ndarray
    reference: np.ndarray


def draw(num_prompts: int, num_reference: int, num_resamples: int = NUM_RESAMPLES, seed: int = 0,
         reference_follows_prompts: bool = False) -> Draws:
    """Resample counts: each row of ``prompts`` holds how often each of the N prompts was drawn (N draws with
    replacement); the reference is drawn on its own, or with the prompts' counts when image i of the
    reference belongs to prompt i (``reference_follows_prompts``, which needs M == N)."""
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if reference_follows_prompts and num_reference != num_prompts:
        raise ValueError(f"a prompt-paired reference needs one image per prompt: {num_reference} != {num_prompts}")
    rng = np.random.default_rng(seed)
    prompts = rng.multinomial(num_prompts, np.full(num_prompts, 1.0 / num_prompts), size=num_resamples)
    reference = prompts if reference_follows_prompts else rng.multinomial(
        num_reference, np.full(num_reference, 1.0 / num_reference), size=num_resamples)
    return Draws(prompts.astype(np.float64), reference.astype(np.float64))


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _within(gram: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sum_{i != j} c_i c_j K_ij / (n^2 - sum c_i^2) for each row of counts [P, n] -> [P]; pairs of a row
    with its own copies (the diagonal, weighted c_i^2) are left out."""
    n = counts.sum(1)
    total = ((counts @ gram) * counts).sum(1) - (counts ** 2) @ np.diag(gram)
    with np.errstate(invalid="ignore", divide="ignore"):  # one distinct row drawn: no pair, NaN
        return total / (n ** 2 - (counts ** 2).sum(1))


def kid_reference(reference: np.ndarray, counts_r: np.ndarray) -> dict:
    """What KID's resamples share across rows: the reference, its counts and its within-set term [P]."""
    r = np.asarray(reference, np.float64)
    return {"reference": r, "counts": counts_r, "within": _within(_kernel(r, r), counts_r)}


def kid_resamples(generated: np.ndarray, reference: np.ndarray, counts_g: np.ndarray,
                  counts_r: np.ndarray, prepared: dict | None = None, *, paired: bool = False) -> np.ndarray:
    """KID (unbiased MMD^2) of weighted ``generated`` [N, D] against weighted ``reference`` [M, D], one value per
    row of counts_g [P, N] / counts_r [P, M]; ``prepared``: ``kid_reference(reference, counts_r)``, reused.
    ``paired``: reference row i belongs to generated row i (drawn with ``reference_follows_prompts``); the cross
    term then leaves out each pair's own copies, like the within terms (``metrics.kid(paired=True)``)."""
    ref = prepared if prepared is not None else kid_reference(reference, counts_r)
    g, r = np.asarray(generated, np.float64), ref["reference"]
    if paired:
        cross = _within(_kernel(g, r), counts_g)
    else:
        cross = ((counts_g @ _kernel(g, r)) * counts_r).sum(1) / (counts_g.sum(1) * counts_r.sum(1))
    return _within(_kernel(g, g), counts_g) + ref["within"] - 2.0 * cross


def _weighted_stats(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of the rows of x [n, D] taken counts [n] times each."""
    n = counts.sum()
    mu = counts @ x / n
    centred = x - mu
    return mu, (centred * counts[:, None]).T @ centred / (n - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative rounding-error eigenvalues clipped to 0)."""
    vals, vecs = np.linalg.eigh(sigma)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def fid_reference(reference: np.ndarray, counts_r: np.ndarray) -> list[tuple]:
    """What FID's resamples share across rows: per resample the reference's mean, trace and covariance root."""
    r = np.asarray(reference, np.float64)
    out = []
    for cr in counts_r:
        mu, sigma = _weighted_stats(r, cr)
        out.append((mu, float(np.trace(sigma)), _psd_sqrt(sigma)))
    return out


def fid_resamples(generated: np.ndarray, reference: np.ndarray, counts_g: np.ndarray,
                  counts_r: np.ndarray, prepared: list | None = None) -> np.ndarray:
    """FID of weighted ``generated`` against weighted ``reference``, one value per resample -> [P]:
    |mu_g - mu_r|^2 + tr S_g + tr S_r - 2 tr (S_g S_r)^(1/2) (Heusel et al. 2017), with tr (S_g S_r)^(1/2) the
    sum of the square roots of the eigenvalues of S_r^(1/2) S_g S_r^(1/2) (same spectrum, symmetric);
    ``prepared``: ``fid_reference(reference, counts_r)``, reused."""
    ref = prepared if prepared is not None else fid_reference(reference, counts_r)
    g = np.asarray(generated, np.float64)
    out = []
    for cg, (mu_r, trace_r, root_r) in zip(counts_g, ref):
        mu, sigma = _weighted_stats(g, cg)
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_r @ sigma @ root_r), 0.0, None)).sum()
        out.append(max(float((mu - mu_r) @ (mu - mu_r) + np.trace(sigma) + trace_r - 2.0 * cross), 0.0))
    return np.array(out)


def mean_resamples(values: np.ndarray, reference, counts_g: np.ndarray, counts_r: np.ndarray,
                   prepared=None) -> np.ndarray:
    """A per-image score's mean (accuracy, caption score) under each resample of the prompts -> [P]; NaN marks
    an image the score leaves out (an attribute its prompt does not name); the reference plays no part (same
    signature as the set statistics)."""
    values = np.asarray(values, np.float64)
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):  # no drawn image has a value: NaN
        return counts_g @ np.where(present, values, 0.0) / (counts_g @ present)


STATISTICS = {"kid": kid_resamples, "fid": fid_resamples, "mean": mean_resamples}
PREPARE = {"kid": kid_reference, "fid": fid_reference, "mean": lambda reference, counts_r: None}


def percentile_interval(values: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """The alpha/2 and 1 - alpha/2 percentiles of bootstrap values; resamples where the statistic is undefined
    (NaN: a set drawn as copies of one image, a score no drawn image has) are left out, which only happens on
    a handful of prompts. ValueError when every resample is."""
    values = np.asarray(values, np.float64)
    if np.isnan(values).all():
        raise ValueError("the statistic is undefined on every resample: too few prompts")
    lo, hi = np.nanquantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def resample(rows: dict[str, np.ndarray], reference: np.ndarray | None, statistic: str,
             draws: Draws) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``statistic`` of each row on the full sets (point) and on every resample of ``draws`` (boot [P]); rows
    with identical values share one computation. See ``intervals`` for the arguments."""
    fn, n = STATISTICS[statistic], len(draws.prompts[0])
    ones_g, ones_r = np.ones((1, n)), np.ones((1, len(draws.reference[0])))
    full = boot_ref = None
    point, boot = {}, {}
    for name, values in rows.items():
        if len(values) != n:
            raise ValueError(f"row {name!r} has {len(values)} images, the draws {n}: rows must share prompts")
        same = next((m for m in point if np.array_equal(rows[m], values)), None)  # identical images: reuse
        if same is not None:
            point[name], boot[name] = point[same], boot[same]
            continue
        if full is None:  # the reference's share of the work, once for every row
            full, boot_ref = PREPARE[statistic](reference, ones_r), PREPARE[statistic](reference, draws.reference)
        point[name] = float(fn(values, reference, ones_g, ones_r, full)[0])
        boot[name] = fn(values, reference, draws.prompts, draws.reference, boot_ref)
    return point, boot


def paired(point: dict[str, float], boot: dict[str, np.ndarray], name: str, baseline: str,
           alpha: float = ALPHA) -> dict:
    """The paired difference row - baseline on the same resamples: {"diff", "diff_ci"}."""
    return {"diff": point[name] - point[baseline],
            "diff_ci": list(percentile_interval(boot[name] - boot[baseline], alpha))}


def intervals(rows: dict[str, np.ndarray], reference: np.ndarray | None, statistic: str, draws: Draws,
              baseline: str | None = None, alpha: float = ALPHA) -> dict[str, dict]:
    """Point value and percentile interval of ``statistic`` for each row, and with ``baseline`` the paired
    difference (row - baseline) with its interval.

    Args:
        rows: name -> per-image features [N, D] (kid, fid) or per-image scores [N] (mean); every row holds
            the same N prompts and seeds in the same order.
        reference: reference features [M, D] (None for ``mean``).
        statistic: "kid", "fid" or "mean".
        draws: the resample counts (``draw``), shared by every row.
        baseline: a key of rows, or None.

    Returns:
        name -> {"value", "ci": [lo, hi]} plus, with a baseline, "diff" and "diff_ci" (the baseline's own: 0, [0, 0]).
    """
    if baseline is not None and baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not a row: {sorted(rows)}")
    point, boot = resample(rows, reference, statistic, draws)
    out = {}
    for name in rows:
        out[name] = {"value": point[name], "ci": list(percentile_interval(boot[name], alpha))}
        if baseline is not None:
            out[name].update(paired(point, boot, name, baseline, alpha))
    return out


def resolved(diff_ci: list[float]) -> bool:
    """Whether a paired difference's interval excludes 0: only then may one row be called better."""
    return diff_ci[0] > 0 or diff_ci[1] < 0
