"""Export one training checkpoint of an `lcm distill` run as an LCM folder (to evaluate a run mid-way).

    python scripts/checkpoint_to_lcm.py --run runs/lcm --checkpoint step-0002500.safetensors --out runs/lcm-2500

The card's command names the run's `lcm distill` line and, for a run that continued another one
(`--init-student RUN`, e.g. the guidance-distillation stage), that run's line first.
"""
import argparse
import json
import re
from pathlib import Path

from latentcm import registry
from latentcm.bundle import Bundle, sampling_schedule
from latentcm.defaults import RENOISE, SKIP, TIMESTEP_SCHEDULES
from latentcm.export.pipeline import export_lcm
from latentcm.models.denoiser import make_student
from latentcm.training.checkpoint import load_checkpoint


def run_command(run: Path) -> str | None:
    """The `lcm distill` command of a run, from the card its finished export wrote (None when there is none)."""
    card = run / "README.md"
    found = re.search(r"^(lcm distill [^\n]*)$", card.read_text(), re.M) if card.is_file() else None
    return found.group(1) if found else None


def commands(run: Path) -> list[str]:
    """The `lcm distill` lines that made ``run``: its ``--init-student`` run's (recursively) first, then its own."""
    own = run_command(run)
    if own is None:
        return []
    parent = re.search(r"--init-student (\S+)", own)
    return (commands(Path(parent.group(1))) if parent else []) + [own]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", required=True, help="file name in RUN/checkpoints, or a path")
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--out", required=True)
    ap.add_argument("--which", choices=["student", "target", "student_ema"], default="student",
                    help="online student, EMA target, or the slow EMA of a run made with --student-ema")
    ap.add_argument("--schedule", choices=TIMESTEP_SCHEDULES, default=None,
                    help="timestep schedule of the folder's sampling.json (default: the run's, else grid)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="default g of the folder's sampling.json and card (default: none, the kind's default)")
    ap.add_argument("--renoise", choices=RENOISE, default="fresh",
                    help="the LCM sampler's default re-noising, written to sampling.json and the card")
    args = ap.parse_args()
    path = Path(args.checkpoint)
    path = path if path.is_file() else Path(args.run) / "checkpoints" / args.checkpoint
    teacher = Bundle.load(registry.resolve(args.teacher))
    modules = {name: make_student(teacher.unet) for name in ("student", "target", args.which)}
    meta = load_checkpoint(path, modules, None)
    lcd = meta.get("lcd", {})
    export = (f"python scripts/checkpoint_to_lcm.py --run {args.run} --checkpoint {path.name} --which {args.which}"
              + (f" --guidance {args.guidance:g}" if args.guidance is not None else "")
              + (f" --renoise {args.renoise}" if args.renoise != "fresh" else ""))
    made_by = commands(Path(args.run))
    distill = "\n".join(made_by) or None
    own = made_by[-1] if made_by else ""
    lr = re.search(r"--lr (\S+)", own)
    schedule = re.search(r"--lr-schedule (\S+)", own)
    loop = {"lr": f"{lr.group(1)}{f' ({schedule.group(1)})' if schedule else ''}"} if lr else {}
    guided = re.search(r"--guided-teacher (\S+)", own)
    export_lcm(modules[args.which], teacher, args.out,
               {"command": f"{distill}\n{export}" if distill else export, "teacher": args.teacher,
                "steps": meta["step"], "lcd": lcd, "loop": loop,
                "guided_teacher": guided.group(1) if guided else None}, skip=lcd.get("skip", SKIP),
               schedule=args.schedule or sampling_schedule(Path(args.run)), guidance=args.guidance,
               renoise=args.renoise)
    print(json.dumps({"out": args.out, "step": meta["step"]}))


if __name__ == "__main__":
    main()
