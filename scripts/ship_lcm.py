"""Ship a finished distillation into the package: copy, evaluate, benchmark, extend the card.

    python scripts/ship_lcm.py --run runs/lcm [--num-samples 256] [--schedule grid|refine] [--guidance G]

Copies the LatentConsistencyModelPipeline parts of RUN into src/latentcm/weights/lcm (UNet stored
in fp16; diffusers loads it back as fp32) with RUN's sampling.json (its timestep schedule, default g and
negative-prompt mode; --schedule and --guidance replace the first two), runs `lcm evaluate --preset lcm` on the
shipped copies (samples cached in runs/lcm-preset-N, so the teacher rows are reused; results copied to
reports/lcm/) and the sampling benchmark (reports/lcm/bench.txt), and appends the measured table to the card.
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel

from latentcm.bundle.loading import sampling_settings
from latentcm.defaults import TIMESTEP_SCHEDULES
from latentcm.export.pipeline import write_sampling_settings

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "latentcm" / "weights" / "lcm"
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def run(*args: str, out: Path | None = None) -> None:
    text = subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=out is not None,
                          text=True).stdout
    if out is not None:
        out.write_text(text)
        print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/lcm")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--schedule", choices=TIMESTEP_SCHEDULES, default=None,
                    help="timestep schedule of the shipped LCM's sampling.json (default: RUN's)")
    ap.add_argument("--guidance", type=float, default=None, help="its default g (default: RUN's, if it names one)")
    args = ap.parse_args()
    src = (ROOT / args.run).resolve()
    found = sampling_settings(src)
    shutil.rmtree(DEST, ignore_errors=True)
    DEST.mkdir(parents=True)
    for part in PARTS:
        shutil.copytree(src / part, DEST / part)
    for name in ("model_index.json", "README.md"):
        shutil.copy(src / name, DEST / name)
    UNet2DConditionModel.from_pretrained(src / "unet").half().save_pretrained(DEST / "unet")
    given = {"timestep_schedule": args.schedule, "guidance": args.guidance}
    write_sampling_settings(DEST, {**found, **{k: v for k, v in given.items() if v is not None}})
    reports = ROOT / "reports" / "lcm"
    reports.mkdir(parents=True, exist_ok=True)
    cache = f"runs/lcm-preset-{args.num_samples}"
    eval_args = ["evaluate", "--preset", "lcm", "--model", "lcm", "--teacher", "teacher",
                 "--num-samples", str(args.num_samples), "--out", cache]
    run("-m", "latentcm.cli", *eval_args)
    for name in ("results.json", "results.md"):
        shutil.copy(ROOT / cache / name, reports / name)
    run("benchmarks/bench_sampling.py", "--batch-size", "16", "--repeats", "3", out=reports / "bench.txt")
    table = (reports / "results.md").read_text()
    with open(DEST / "README.md", "a") as fh:
        fh.write(f"\n## Measured quality\n\nHeld-out prompts, scored by the independent judge "
                 f"(`lcm {' '.join(eval_args)}`; 2-core CPU):\n\n{table}\n"
                 f"\nSampling speed (`python benchmarks/bench_sampling.py --batch-size 16 --repeats 3`):\n\n"
                 f"```\n{(reports / 'bench.txt').read_text()}```\n")


if __name__ == "__main__":
    main()
