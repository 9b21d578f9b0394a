"""Does the initial noise set the background at g = 1, and does an LCM follow it as its teacher's ODE does?

    python scripts/noise_background_probe.py ROW [ROW ...] [--num-samples 1000] [--guidance 1]
        [--cache SWEEP/samples] [--out FILE.json] [--plot FILE.png]

ROWs as in ``unguided_samplers.py``, on its prompts and seeds (image i from seed i); the first row is the reference,
normally ``teacher:ode:50``. An image is "off" when the judge reads another background than its caption names. The
features of image i are the four channel means of its initial latent x_T (``sampling.teacher.initial_latents``),
each standardised and crossed with the caption's background (one-hot), plus that one-hot.

- ``auc``: how far these features decide a row's off images: a ridge logistic model's 5-fold cross-validated AUC.
- ``bins``: the first row's out-of-fold score, cut at its quantiles (``BIN_EDGES``), and every row's off rate in each
  bin (the same images in every row) with a 95% percentile bootstrap interval over the bin's images. A model that
  makes the first row's choices has its rising curve; one that falls back on the caption's background has a
  flatter one.
- ``of_first_off``: the share of the first row's off images that are off in this row too, with its interval.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.evaluation import references, scoring
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.sampling.teacher import initial_latents
from unguided_samplers import label, parse_row, row_images

BIN_EDGES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)   # quantiles of the first row's score
FOLDS, RIDGE = 5, 1e-2


def features(bundle: Bundle, captions: list[dict], n: int) -> np.ndarray:
    """[N, K + 4K]: the caption's background one-hot (K values), and it times the standardised channel means of x_T."""
    o = bundle.sampling_options(None, sampler="lcm" if bundle.is_lcm else "ddim", steps=1, guidance=1.0)
    means = initial_latents(list(range(n)), bundle.latent_shape(o.height, o.width)).mean((2, 3)).double().numpy()
    means = (means - means.mean(0)) / means.std(0)  # [N, 4]
    values = sorted({c["background"] for c in captions})
    onehot = np.array([[c["background"] == v for v in values] for c in captions], dtype=float)  # [N, K]
    return np.concatenate([onehot, (onehot[:, :, None] * means[:, None, :]).reshape(n, -1)], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge logistic regression (L-BFGS), weights and bias."""
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + RIDGE * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def out_of_fold(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each image's score from the model fitted on the other folds [N]."""
    order, score = np.random.default_rng(0).permutation(len(y)), np.zeros(len(y))
    for f in range(FOLDS):
        test = order[f::FOLDS]
        w, b = fit_logistic(np.delete(x, test, axis=0), np.delete(y, test))
        score[test] = (torch.tensor(x[test]) @ w + b).numpy()
    return score


def auc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def rate(y: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> dict:
    """The share of ones in points, with a 95% percentile bootstrap interval."""
    draws = y[rng.integers(0, len(y), size=(resamples, len(y)))].mean(axis=1)
    return {"rate": float(100 * y.mean()), "ci": [float(100 * q) for q in np.percentile(draws, [2.5, 97.5])],
            "n": int(len(y))}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [f"{int(100 * a)}-{int(100 * b)}%" for a, b in zip(BIN_EDGES[:-1], BIN_EDGES[1:])]
    for i, r in enumerate(results):
        xs = np.arange(len(names)) + 0.08 * (i - len(results) / 2)
        ys = [b["rate"] for b in r["bins"]]
        err = [[y - b["ci"][0] for y, b in zip(ys, r["bins"])], [b["ci"][1] - y for y, b in zip(ys, r["bins"])]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=r["label"])
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("bin of the first row's score (quantiles of caption x channel means of x_T)")
    ax.set_ylabel("background not the caption's, % (95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", metavar="ROW")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--cache", type=Path, default=None, help="sample cache of `lcm ablate guidance` (ode rows)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file the results are written to")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the off rate per bin, every row")
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.rows]
    torch.manual_seed(0)
    pairs = references.heldout_prompts(args.num_samples)
    prompts, captions = [p for p, _ in pairs], [c for _, c in pairs]
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    reference = references.reference_set(extractor, "prompt-scenes")
    bundles = {rows[0]["model"]: Bundle.load(registry.resolve(rows[0]["model"]))}
    x = features(bundles[rows[0]["model"]], captions, args.num_samples)  # every row's images share their x_T
    results, rng, first_off, edges, first_score = [], np.random.default_rng(0), None, None, None
    for row in rows:
        images = row_images(row, bundles, prompts, args.guidance, args.cache)
        scores = scoring.score(images, prompts, extractor, reference, per_image=True)
        off = 1.0 - scores["per_image"]["attribute_accuracy"]["background"]  # [N]; every caption names one
        score = out_of_fold(x, off)
        if first_off is None:
            first_off, first_score = off, score
            edges = np.quantile(score, BIN_EDGES)
        which = np.clip(np.searchsorted(edges, first_score, side="right") - 1, 0, len(BIN_EDGES) - 2)
        record = {**row, "label": label(row), "off": rate(off, rng), "auc": auc(score, off),
                  "of_first_off": rate(off[first_off == 1], rng),
                  "bins": [rate(off[which == i], rng) for i in range(len(BIN_EDGES) - 1)]}
        results.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
    summary = {"num_samples": args.num_samples, "guidance": args.guidance, "bin_edges": BIN_EDGES, "rows": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(results, args.plot)
    bins = " | ".join(f"{int(100 * a)}-{int(100 * b)}%" for a, b in zip(BIN_EDGES[:-1], BIN_EDGES[1:]))
    print(f"| row (g = {args.guidance:g}, n = {args.num_samples}) | off % | AUC | of the first row's off % | {bins} |")
    print("|---" * (4 + len(BIN_EDGES) - 1) + "|")
    for r in results:
        cells = " | ".join(f"{b['rate']:.0f} [{b['ci'][0]:.0f}, {b['ci'][1]:.0f}]" for b in r["bins"])
        o = r["of_first_off"]
        print(f"| {r['label']} | {r['off']['rate']:.1f} | {r['auc']:.2f} | {o['rate']:.1f} [{o['ci'][0]:.1f}, "
              f"{o['ci'][1]:.1f}] | {cells} |")


if __name__ == "__main__":
    main()
