"""Loss and gradient-norm curves of a training run's metrics.csv (running mean over a window).

    python scripts/plot_loss.py RUN/metrics.csv OUT.png [--window 100]
"""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def running_mean(x: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--window", type=int, default=100)
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.metrics)))
    step = np.array([int(r["step"]) for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("loss", "grad_norm")):
        y = np.array([float(r[key]) for r in rows])
        ax.plot(step, y, color="0.8", lw=0.5)
        ax.plot(step[args.window - 1:], running_mean(y, args.window), color="C0")
        ax.set_xlabel("step")
        ax.set_title(f"{key} (running mean of {args.window})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
