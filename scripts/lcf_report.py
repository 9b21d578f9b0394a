"""Can LCF adapt the shipped LCM to a new style without a teacher, against fine-tune-then-distil? Writes reports/lcf/.

    python scripts/lcf_report.py [--work runs/lcf] [--out reports/lcf] [--lcf-steps 600] [--lcf K:LR ...]

1. export the striped set (train part) as an image folder;
2. LCF of the shipped LCM on it (`lcm finetune`), once per --lcf setting (the first is "after"), timed;
3. the usual alternative: plain diffusion fine-tuning of the shipped teacher (`lcm finetune-teacher`),
   then distilling it again on the same folder (`lcm distill --data`), both timed;
4. the evaluation pipeline on the striped held-out captions at 1, 2 and 4 steps: before (the shipped LCM), after
   LCF, and fine-tune-then-distil. Writes results.json (before / after / baseline lists), results.md
   and sample grids.

Each finished stage is kept: rerunning the same command continues where it stopped.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from latentcm import registry
from latentcm.defaults import LCM_GUIDANCE
from latentcm.evaluation import lcf_eval, style
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.references import default_cache_dir
from latentcm.bundle import Bundle
from latentcm.training.loop import training_minutes


def run_once(args: list[str], done: Path, resume_dir: Path | None = None) -> None:
    """Run ``lcm args`` unless ``done`` exists (resuming from ``resume_dir``'s checkpoints when it has some)."""
    if done.exists():
        return
    if resume_dir is not None and (resume_dir / "checkpoints").exists():
        args = [*args, "--resume"]
    print("$ lcm " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "latentcm.cli", *args], check=True)


def _label(name: str) -> str:
    """lcf-k20-lr1e-4[-t499] -> "k = 20, lr 1e-4, t <= 499" (or "all t")."""
    k, rest = name.removeprefix("lcf-k").split("-lr")
    lr, _, t = rest.partition("-t")
    return f"k = {k}, lr {lr}, " + (f"t <= {t}" if t else "all t")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/lcf")
    ap.add_argument("--out", default="reports/lcf")
    ap.add_argument("--count", type=int, default=3000, help="training images of the striped set")
    ap.add_argument("--lcf-steps", type=int, default=600)
    ap.add_argument("--lcf", action="append", metavar="K:LR[:TMAX]",
                    help="LCF settings (skipping interval k : learning rate [: --max-timestep, default all]), "
                         "repeatable; the first is reported as 'after', the others as a sweep "
                         "[default: 20:1e-4:499 (the LCM's own grid, low-noise half)]")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--distill-steps", type=int, default=800)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--no-baseline", action="store_true", help="skip fine-tune-then-distil")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "striped-train"
    settings = [v.split(":") for v in (args.lcf or ["20:1e-4:499"])]
    names = ["lcf-" + "-".join(f"{key}{v}" for key, v in zip(("k", "lr", "t"), parts)) for parts in settings]
    lcf_dirs = {name: work / f"{name}-n{args.lcf_steps}" for name in names}
    commands = {
        "export": ["world", "export", str(data), "--style", "striped", "--split", "train", "--count", str(args.count)],
        **{name: ["finetune", "--model", "lcm", "--data", str(data), "--out", str(lcf_dirs[name]), "--skip", parts[0],
                  "--max-steps", str(args.lcf_steps), "--lr", parts[1],
                  "--max-timestep", parts[2] if len(parts) > 2 else "999"]
           for name, parts in zip(names, settings)},
        "teacher_finetune": ["finetune-teacher", "--teacher", "teacher", "--data", str(data), "--out",
                             str(work / "teacher-ft"), "--max-steps", str(args.teacher_steps), "--lr", "1e-4"],
        "distill": ["distill", "--teacher", str(work / "teacher-ft"), "--data", str(data), "--out",
                    str(work / "lcm-ft"), "--max-steps", str(args.distill_steps), "--loss", "huber"],
    }
    run_once(commands["export"], data / "metadata.jsonl")
    for name, d in lcf_dirs.items():
        run_once(commands[name], d / "model_index.json", d)
    timings = {name: training_minutes(d) for name, d in lcf_dirs.items()}
    if not args.no_baseline:
        run_once(commands["teacher_finetune"], work / "teacher-ft" / "model_index.json", work / "teacher-ft")
        run_once(commands["distill"], work / "lcm-ft" / "model_index.json", work / "lcm-ft")
        timings.update(teacher_finetune=training_minutes(work / "teacher-ft"),
                       distill=training_minutes(work / "lcm-ft"))

    bundles = {"before": Bundle.load(registry.resolve("lcm")), "after": Bundle.load(lcf_dirs[names[0]])}
    if not args.no_baseline:
        bundles["baseline"] = Bundle.load(work / "lcm-ft")
    bundles.update({name: Bundle.load(lcf_dirs[name]) for name in names[1:]})
    extractor = JudgeExtractor.load(registry.resolve("judge"))
    style_judge, tag, vae = style.load_or_train_for(registry.resolve("lcm"), default_cache_dir())
    results = lcf_eval.evaluate_models(bundles, extractor, style_judge, out, num_samples=args.num_samples,
                                       guidance=LCM_GUIDANCE)
    ceiling = lcf_eval.ceilings(extractor, style_judge, vae, num_samples=args.num_samples)
    extra = {"ceilings": ceiling, "commands": {k: "lcm " + " ".join(v) for k, v in commands.items()},
             "training_minutes": timings,
             "style_judge": {"tag": tag, **style.heldout_accuracy(style_judge, vae=vae)},
             "num_samples": args.num_samples, "guidance": LCM_GUIDANCE}
    labels = {"before": "shipped LCM (before)", "after": f"after LCF ({_label(names[0])})",
              "baseline": "fine-tune teacher, distil again", **{n: f"LCF {_label(n)}" for n in names[1:]}}
    lcf_eval.write(out, results, extra, labels)
    print(lcf_eval.markdown(results, labels, ceiling))
    print(json.dumps(extra, indent=2))


if __name__ == "__main__":
    main()
