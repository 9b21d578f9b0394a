"""What `lcm ablate solver-skip` costs on this machine, to budget its runs: wall seconds of the teacher's guided ODE
reference per image (made once per OUT), of one probe at --num-samples (sampling the student, scoring against real
images and against an ODE-sized reference), and of --iterations LCD iterations at the ablation's recipe (batch 16,
slow EMA of the student, cosine lr), plus encoding the world data once.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_solver_skip_budget.py
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from latentcm import registry, world
from latentcm.bundle import Bundle
from latentcm.evaluation import references, scoring
from latentcm.evaluation import solver_skip as S
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.models.denoiser import make_student
from latentcm.schedules import grid_size, train_timesteps
from latentcm.training import recipes
from latentcm.training.consistency import LCDConfig
from latentcm.training.loop import LoopConfig


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--num-samples", type=int, default=S.NUM_SAMPLES, help="images per probe")
    ap.add_argument("--ode-samples", type=int, default=32, help="ODE images timed (the cost per image is reported)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--num-data", type=int, default=4000)
    ap.add_argument("--pair", default="ddim:20")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    solver, k = args.pair.split(":")[0], int(args.pair.split(":")[1])
    teacher = registry.resolve(args.teacher)
    bundle, extractor = Bundle.load(teacher), JudgeExtractor.load(registry.resolve(args.judge))
    ref = references.reference_set(extractor)
    out = Path(tempfile.mkdtemp(prefix="solver-skip-budget-"))
    found = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    prompts = [p for p, _ in references.heldout_prompts(args.ode_samples)]
    found["ode_s_per_image"] = _timed(lambda: S.ode_target(bundle, prompts, out)) / len(prompts)
    # the probe scores against an ODE reference of num_samples images: the prompts' real scenes stand in (same cost)
    scenes = world.images_array(references.heldout_samples(args.num_samples))
    stand_in = scoring.reference_from_images(scenes, extractor, "stand-in")
    n_grid = grid_size(train_timesteps(bundle.scheduler_config), k)
    probe = S.fid_probe(bundle, extractor, ref, args.num_samples, n_grid, out / "probe.jsonl", ode_reference=stand_in)
    student = make_student(bundle.unet, LCDConfig().time_cond_proj_dim)
    found["probe_s"] = _timed(lambda: probe(student, 0, out))
    loop = LoopConfig(max_steps=args.iterations, lr=S.LR, warmup=0, schedule="cosine", min_lr_ratio=S.MIN_LR_RATIO,
                      checkpoint_every=args.iterations, keep_checkpoints=1)
    lcd = LCDConfig(solver=solver, skip=k, loss="huber", batch_size=S.BATCH_SIZE, student_ema=S.STUDENT_EMA)
    job = recipes.Job(teacher, out / "run", loop, lcd=lcd, num_data=args.num_data, export=False,
                      data_cache=out / "data-cache.safetensors")
    total = _timed(lambda: recipes.run("distill", job))
    with open(out / "run" / "metrics.csv") as f:
        train = float(list(csv.DictReader(f))[-1]["time_s"])
    found.update({f"lcd_{args.iterations}_iterations_s": train, "data_and_setup_s": total - train,
                  "num_samples": args.num_samples, "pair": args.pair, "batch_size": S.BATCH_SIZE,
                  "load_after": os.getloadavg()})
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in found.items()}))


if __name__ == "__main__":
    main()
