"""How a guidance-distillation run learnt to follow w, per timestep: the norm ratio and the cosine of the student's
w-difference to the teacher's CFG difference, from its ``previews/w-following.jsonl`` (``training.guided``).

    python scripts/plot_w_following.py RUN/previews/w-following.jsonl OUT.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("out")
    args = ap.parse_args()
    records = [json.loads(line) for line in open(args.log) if line.strip()]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for key, ax, title in (("norm_ratio", axes[0], "|D_student| / |D_teacher|"),
                           ("cosine", axes[1], "cosine(D_student, D_teacher)")):
        for i, t in enumerate(r["t"] for r in records[0]["per_t"]):
            ax.plot(steps, [r["per_t"][i][key] for r in records], marker="o", label=f"t = {t}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title=title, xlabel="training step", ylim=(0, 1.1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("guidance distillation: the student's w-difference eps(w=6.5) - eps(w=0) against the teacher's "
                 "6.5 (eps_c - eps_0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
