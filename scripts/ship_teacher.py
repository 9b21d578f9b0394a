"""Ship a finished teacher build into the package: export, copy, evaluate, write the model card.

    python scripts/ship_teacher.py --build runs/build [--num-samples 256] [--card-only]

Runs `lcm train-teacher export`, copies the teacher and judge into src/latentcm/weights/,
runs `lcm evaluate --preset teacher` on the shipped copies (results in reports/teacher/) and writes
the teacher's model card from those results and the build's logs.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from latentcm.defaults import TEACHER_DEFAULTS
from latentcm.evaluation.results import read_results
from latentcm.teacher_build import card
from latentcm.teacher_build import stages as build

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "src" / "latentcm" / "weights"
BUILD_COMMANDS = [
    "lcm train-teacher all --out runs/build --seed 0     # VAE -> tiny CLIP -> judge -> UNet; add --resume after an interruption",
    "python scripts/ship_teacher.py --build runs/build  # export, copy into the package, evaluate, write this card",
]


def lcm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "latentcm.cli", *args], check=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="runs/build")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--card-only", action="store_true", help="Only rewrite the card from existing results.")
    ap.add_argument("--note", default="", help="A paragraph about this build for the card's Limits section.")
    args = ap.parse_args()
    out = (ROOT / args.build).resolve()
    sampler, steps, guidance = TEACHER_DEFAULTS
    eval_args = ["evaluate", "--preset", "teacher", "--model", "teacher", "--judge", "judge", "--samplers", sampler,
                 "--steps", str(steps), "--guidance", f"{guidance:g}", "--num-samples", str(args.num_samples),
                 "--out", "reports/teacher"]
    if not args.card_only:
        ship_and_evaluate(out, eval_args)
    results = read_results(ROOT / "reports" / "teacher" / "results.json")
    info = build.build_info(out)
    (ROOT / "reports" / "teacher" / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    templates = ROOT / "reports" / "teacher" / "templates.md"
    extra = {"templates": templates.read_text()} if templates.is_file() else {}
    print(card.write_teacher_card(WEIGHTS / "teacher", results, info, BUILD_COMMANDS, "lcm " + " ".join(eval_args),
                                  build_note=args.note, **extra))


def ship_and_evaluate(out: Path, eval_args: list[str]) -> None:
    lcm("train-teacher", "export", "--out", str(out))
    shutil.rmtree(WEIGHTS / "teacher", ignore_errors=True)
    shutil.copytree(out / "teacher", WEIGHTS / "teacher")
    (WEIGHTS / "judge").mkdir(parents=True, exist_ok=True)
    for name in ("judge.safetensors", "config.json"):
        shutil.copy(out / "judge" / "final" / name, WEIGHTS / "judge" / name)
    lcm(*eval_args)
    shutil.copy(ROOT / "reports" / "teacher" / "heldout-grid.png", WEIGHTS / "teacher" / "samples.png")


if __name__ == "__main__":
    main()
