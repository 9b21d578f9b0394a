"""Score sampling settings on VALIDATION prompts, to choose a recipe without looking at Table 1's prompts.

    python scripts/validation_probe.py ROW [ROW ...] [--num-samples 1000] [--out FILE.jsonl]

ROW is MODEL:SAMPLER:STEPS:G[:EXTRA] -- a model name or folder, a sampler (lcm, ddim, ddim-trailing, ...),
the step count and the guidance scale g. EXTRA is, for teacher samplers, a guidance interval MAX_T (CFG only
at t <= MAX_T), and for the LCM a timestep schedule: grid or refine, or an explicit T/T/... of STEPS timesteps
(without EXTRA the LCM samples with its folder's own schedule). Examples:
teacher:ddim-trailing:50:8.5:499 is the teacher's guided ODE from t = 999 with guidance below t = 500 only;
lcm:lcm:4:8.5:999/499/299/99 is the shipped LCM on that 4-step schedule.

The prompts are held-out captions of world seed 100 (``lcm evaluate`` uses seed 99), image i is seeded
50000 + i, and every row is scored by ``scoring.score`` against the independent reference (KID x 10^3,
FID, caption score, per-attribute judge accuracy). One JSON line per row is appended to --out, and a
markdown table of all rows is printed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.images import to_pixels
from latentcm.evaluation import references, scoring
from latentcm.evaluation.extractors import JudgeExtractor

VALIDATION_SEED = 100  # world seed of the validation prompts (Table 1's are references.PROMPT_SEED = 99)
IMAGE_SEED = 50000     # image i is seeded IMAGE_SEED + i


def parse_row(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (4, 5):
        sys.exit(f"error: a row is MODEL:SAMPLER:STEPS:G[:MAX_T or T/T/...], got {text!r}")
    try:
        row = {"model": parts[0], "sampler": parts[1], "steps": int(parts[2]), "guidance": float(parts[3]),
               "guidance_max_t": None, "timesteps": None, "schedule": None}
        if len(parts) == 5 and parts[1] == "lcm" and parts[4] in ("grid", "refine"):
            row["schedule"] = parts[4]
        elif len(parts) == 5 and parts[1] == "lcm":
            row["timesteps"] = [int(t) for t in parts[4].split("/")]
        elif len(parts) == 5:
            row["guidance_max_t"] = int(parts[4])
    except ValueError:
        sys.exit(f"error: STEPS, MAX_T and timesteps are integers and G a number, got {text!r}")
    if row["timesteps"] is not None and len(row["timesteps"]) != row["steps"]:
        sys.exit(f"error: {row['steps']} steps but {len(row['timesteps'])} timesteps in {text!r}")
    return row


def sample(bundle: Bundle, row: dict, prompts: list[str], batch: int = 50) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), batch):
        seeds = [IMAGE_SEED + i + j for j in range(len(prompts[i:i + batch]))]
        x = bundle.generate(prompts[i:i + batch], seeds, row["sampler"], row["steps"], row["guidance"],
                            guidance_max_t=row["guidance_max_t"], timesteps=row["timesteps"], schedule=row["schedule"])
        images.append(to_pixels(x))  # 8-bit [B, H, W, 3]
    return np.concatenate(images)


def extra(r: dict) -> str:
    if r.get("schedule"):
        return f"{r['schedule']} timesteps"
    if r.get("timesteps"):
        return ", ".join(map(str, r["timesteps"]))
    return "all" if r["guidance_max_t"] is None else str(r["guidance_max_t"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", metavar="ROW")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--out", default=None, help="JSON lines file the rows are appended to")
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.rows]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts = [p for p, _ in references.heldout_prompts(args.num_samples, seed=VALIDATION_SEED)]
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    reference = references.reference_set(extractor, "independent")
    bundles, done = {}, []
    for row in rows:
        bundle = bundles.setdefault(row["model"], Bundle.load(registry.resolve(row["model"])))
        t0 = time.perf_counter()
        scores = scoring.rounded(scoring.score(sample(bundle, row, prompts), prompts, extractor, reference))
        record = {**row, "num_samples": args.num_samples, "validation_seed": VALIDATION_SEED,
                  **{k: scores[k] for k in ("kid", "kid_std", "fid", "caption_score", "attribute_accuracy",
                                            "histogram_distance")}, "seconds": round(time.perf_counter() - t0)}
        done.append(record)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    print("| model | sampler | steps | g | guided t ≤ / timesteps | KID×10³ | FID | caption | colour | background | shape "
          "| size hist. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        a = r["attribute_accuracy"]
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | "
              f"{extra(r)} | {scoring.kid_text(r, 1)} | "
              f"{r['fid']:.1f} | {r['caption_score']:.1f} | {100 * a['colour']:.1f} | {100 * a['background']:.1f} | "
              f"{100 * a['shape']:.1f} | {r['histogram_distance']['size']:.3f} |")
    if args.out:
        print(Path(args.out))


if __name__ == "__main__":
    main()
