"""How much does the distillation target depend on w, and how much of that does the student follow?

    python scripts/w_signal.py --lcm lcm [--guidance-max-t T] [--low 2 --high 7.5] [--num-data 64] [--out FILE]

For one batch of training latents (shapes-world train split, seed 0) noised to each grid point t_{n+k} of the
LCM's skipping grid, the script builds LCD's target f_target(z_hat_{t_n}(w), w, t_n) (LCM Algorithm 1, the
LCM itself as target network, the teacher's guided DDIM step; with --guidance-max-t only below that t) at
w = LOW and w = HIGH, and prints per t the rms change of the target, the rms change of the student's own
prediction f(z_{t_{n+k}}, w, t_{n+k}) between the same two w, and the student's rms error at w = HIGH. A
student that follows w has a prediction change near the target's.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from latentcm import registry, schedules, world
from latentcm.bundle import Bundle
from latentcm.guidance import interval_omega
from latentcm.models.denoiser import load_student
from latentcm.training.consistency import LCDConfig, LCDTask
from latentcm.training.data.tensors import encode_pairs


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lcm", default="lcm")
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--guidance-max-t", type=int, default=None)
    ap.add_argument("--low", type=float, default=2.0)
    ap.add_argument("--high", type=float, default=7.5)
    ap.add_argument("--num-data", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher, lcm = Bundle.load(registry.resolve(args.teacher)), Bundle.load(registry.resolve(args.lcm))
    pairs = [(s.image, s.text) for s in world.iter_samples(0, args.num_data)]
    data = encode_pairs(teacher.vae, teacher.text_encoder, teacher.tokenizer, pairs)
    skip = schedules.skip_of(1000, lcm.original_inference_steps)
    student = load_student(registry.resolve(args.lcm), teacher.unet, lcm.unet.config.time_cond_proj_dim)
    cfg = LCDConfig(batch_size=args.num_data, skip=skip, omega_min=args.low, omega_max=args.high,
                    guidance_max_t=args.guidance_max_t)
    task = LCDTask(teacher.unet, teacher.scheduler_config, data, cfg, student=student)
    task.target_unet.load_state_dict(student.state_dict())  # the target network: the LCM itself
    batch, rows = task.batch(0), []
    with torch.no_grad():
        for t in task.grid.tolist():
            t_start = torch.full((args.num_data,), t)
            t_end = (t_start - skip).clamp(min=0)
            z_s = schedules.add_noise(batch["z0"], batch["noise"], task.alpha_bar[t_start])
            out = {}
            for w in (args.low, args.high):
                omega = torch.full((args.num_data,), w)
                emb = task.w_embedding(omega, z_s.dtype)
                z_hat = task.solver_target(z_s, t_start, t_end, batch["text"],
                                           interval_omega(omega, t_start, cfg.guidance_max_t))
                out[w] = (task.target(z_hat, t_end, batch["text"], emb), task.student(z_s, t_start, batch["text"], emb))
            (tgt_lo, pred_lo), (tgt_hi, pred_hi) = out[args.low], out[args.high]
            rows.append({"t": t, "target_change": rms(tgt_hi - tgt_lo), "student_change": rms(pred_hi - pred_lo),
                         "student_error": rms(pred_hi - tgt_hi)})
    print(f"| t_{{n+k}} | target change w {args.low:g} → {args.high:g} | student change | share | student error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']} | {r['target_change']:.4f} | {r['student_change']:.4f} | "
              f"{r['student_change'] / max(r['target_change'], 1e-12):.2f} | {r['student_error']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
