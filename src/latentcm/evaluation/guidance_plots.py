"""Fig. 4's pictures from a guidance sweep's results dict (``guidance_sweep``): the KID-accuracy trade-off, one
point per g, and the distillation fidelity to the teacher's ODE against g."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _curve(ax, rows: list[dict], label: str, **style) -> None:
    rows = sorted(rows, key=lambda r: r["guidance"])
    xs, ys = [r["kid"] for r in rows], [r["accuracy"] or 0.0 for r in rows]
    ax.plot(xs, ys, marker="o", label=label, **style)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)


def plot_tradeoff(results: dict, path: Path) -> Path:
    """Fig. 4 as a trade-off: KID to real (x, symlog) against accuracy (y), a point per g labelled with g; one
    panel per step count, a curve per LCM and the teacher ODE's curve beside them; the real images as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = results["steps"]
    fig, axes = plt.subplots(1, len(steps), figsize=(4.6 * len(steps), 4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], steps):
        _curve(ax, results["teacher_ode"], f"teacher ODE (DDIM {results['teacher_ode_row']['steps']})", color="black",
               ls="--")
        for model in dict.fromkeys(r["model"] for r in results["records"]):
            _curve(ax, [r for r in results["records"] if r["model"] == model and r["steps"] == n], model)
        floor = results["floor"]
        ax.scatter([floor["kid"]], [floor["accuracy"] or 0.0], marker="*", s=120, color="grey", label="real images")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"{n} step{'s' if n > 1 else ''} (labels: g)", fontsize=10)
        ax.set_xlabel("KID ×10³ to real (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attribute accuracy (colour, background, shape)")
    return _save(fig, path)


def plot_fidelity(results: dict, path: Path) -> Path:
    """Distillation fidelity against g: KID ×10³ of each LCM x steps to the teacher ODE at the same g."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model, n in dict.fromkeys((r["model"], r["steps"]) for r in results["records"]):
        rows = sorted((r for r in results["records"] if r["model"] == model and r["steps"] == n),
                      key=lambda r: r["guidance"])
        ys = [r["fidelity"]["kid"] for r in rows]
        err = None
        if all("kid_ci" in r["fidelity"] for r in rows):
            err = [[y - r["fidelity"]["kid_ci"][0] for y, r in zip(ys, rows)],
                   [r["fidelity"]["kid_ci"][1] - y for y, r in zip(ys, rows)]]
        ax.errorbar([r["guidance"] for r in rows], ys, yerr=np.clip(err, 0, None) if err else None, marker="o",
                    capsize=3, label=f"{model}, {n} step{'s' if n > 1 else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("guidance scale g")
    ax.set_ylabel("KID ×10³ to the teacher ODE at g")
    ax.set_title("distillation fidelity (lower: closer to the ODE)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


__all__ = ["plot_tradeoff", "plot_fidelity"]
