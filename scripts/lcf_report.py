"""The fine-tuning experiment (issue: LCF) end to end, resumable: writes reports/lcf/.

    python scripts/lcf_report.py [--work runs/lcf] [--out reports/lcf] [--lcf-steps 600] ...

1. export the striped set (train part) as an image folder;
2. LCF of the shipped LCM on it (`lcm finetune`), timed;
3. the usual alternative: plain diffusion fine-tuning of the shipped teacher (`lcm finetune-teacher`),
   then distilling it again on the same folder (`lcm distill --data`), both timed;
4. the harness on the striped held-out captions at 1, 2 and 4 steps: before (the shipped LCM), after
   LCF, and fine-tune-then-distil. Writes results.json (before / after / baseline lists), results.md
   and sample grids.

Each finished stage is kept: rerunning the same command continues where it stopped.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from latentcm import registry
from latentcm.evaluation import lcf_eval, style
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.evaluation.harness import default_cache_dir
from latentcm.models.bundle import Bundle


def run_timed(args: list[str], done: Path, timings: dict, key: str, resume_dir: Path | None = None) -> None:
    """Run ``lcm args`` unless ``done`` exists; add its wall minutes to ``timings[key]``."""
    if done.exists():
        return
    if resume_dir is not None and (resume_dir / "checkpoints").exists():
        args = [*args, "--resume"]
    print("$ lcm " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "latentcm.cli", *args], check=True)
    timings[key] = round(timings.get(key, 0.0) + (time.time() - t0) / 60, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/lcf")
    ap.add_argument("--out", default="reports/lcf")
    ap.add_argument("--count", type=int, default=3000, help="training images of the striped set")
    ap.add_argument("--lcf-steps", type=int, default=600)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--distill-steps", type=int, default=800)
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--no-baseline", action="store_true", help="skip fine-tune-then-distil")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    tpath = work / "timings.json"
    timings = json.loads(tpath.read_text()) if tpath.is_file() else {}
    data = work / "striped-train"
    commands = {
        "export": ["world", "export", str(data), "--style", "striped", "--split", "train", "--count", str(args.count)],
        "lcf": ["finetune", "--model", "lcm", "--data", str(data), "--out", str(work / "lcf"),
                "--max-steps", str(args.lcf_steps), "--lr", "1e-4"],
        "teacher_finetune": ["finetune-teacher", "--teacher", "teacher", "--data", str(data), "--out",
                             str(work / "teacher-ft"), "--max-steps", str(args.teacher_steps), "--lr", "1e-4"],
        "distill": ["distill", "--teacher", str(work / "teacher-ft"), "--data", str(data), "--out",
                    str(work / "lcm-ft"), "--max-steps", str(args.distill_steps), "--loss", "huber"],
    }
    run_timed(commands["export"], data / "metadata.jsonl", timings, "export")
    run_timed(commands["lcf"], work / "lcf" / "model_index.json", timings, "lcf", work / "lcf")
    tpath.write_text(json.dumps(timings, indent=2))
    if not args.no_baseline:
        run_timed(commands["teacher_finetune"], work / "teacher-ft" / "model_index.json", timings,
                  "teacher_finetune", work / "teacher-ft")
        tpath.write_text(json.dumps(timings, indent=2))
        run_timed(commands["distill"], work / "lcm-ft" / "model_index.json", timings, "distill", work / "lcm-ft")
        tpath.write_text(json.dumps(timings, indent=2))

    bundles = {"before": Bundle.load(registry.resolve("lcm")), "after": Bundle.load(work / "lcf")}
    if not args.no_baseline:
        bundles["baseline"] = Bundle.load(work / "lcm-ft")
    extractor = JudgeExtractor.load(registry.resolve("judge"))
    style_judge, tag = style.load_or_train(default_cache_dir(), steps=800)
    results = lcf_eval.evaluate_models(bundles, extractor, style_judge, out, num_samples=args.num_samples)
    extra = {"commands": {k: "lcm " + " ".join(v) for k, v in commands.items()}, "wall_minutes": timings,
             "style_judge": {"tag": tag, "heldout_accuracy": style.heldout_accuracy(style_judge)},
             "num_samples": args.num_samples, "guidance": 8.5}
    labels = {"before": "shipped LCM (before)", "after": "after LCF",
              "baseline": "fine-tune teacher, distil again"}
    lcf_eval.write(out, results, extra, labels)
    print(lcf_eval.markdown(results, labels))
    print(json.dumps(extra, indent=2))


if __name__ == "__main__":
    main()
