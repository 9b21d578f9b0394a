"""Does an LCM-LoRA reach the full LCM, and stack with a style LoRA? End to end and resumable: writes reports/lora/.

    python scripts/lora_report.py [--lcm-lora runs/lcm-lora] [--style-data runs/lcf/striped-train] [--out reports/lora]

1. the LCM-LoRA must exist (it is the long step, run it first):
       lcm distill --teacher teacher --out runs/lcm-lora --lora 16 --loss huber --max-steps 1500 \\
           --batch-size 16 --lr 5e-4 --seed 0 --validate-every 500
2. a style LoRA: plain diffusion LoRA of the teacher on the striped set (`lcm finetune-teacher --lora`), timed;
3. the evaluation pipeline on the base world's held-out prompts: LCM-LoRA (1/2/4 steps) against the shipped full LCM
   (1/2/4 steps) and the teacher (DDIM 50 with CFG), with trainable parameters and distillation wall time;
4. the combination lambda1 * style + lambda2 * LCM-LoRA (0.8 / 1.0, and 1.0 / 1.0) on the striped set's
   held-out captions at 1/2/4 steps: FID to real striped images, style accuracy, attribute accuracy.

Writes results.json, results.md, grids/ (and samples/, not committed). Rerunning reuses finished stages
and cached samples.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from latentcm import registry
from latentcm.defaults import LCM_GUIDANCE, LCM_SAMPLER, TEACHER_DEFAULTS
from latentcm.evaluation import lcf_eval, pipeline, references, scoring, style
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.models import lora as lora_io
from latentcm.bundle import Bundle
from latentcm.training.loop import training_minutes

LAMBDAS = ((0.8, 1.0), (1.0, 1.0))  # (style, LCM-LoRA), the LCM-LoRA report's default first


def lora_parameters(folder: Path) -> int:
    """Trainable parameters of a LoRA folder: the elements of its A and B matrices."""
    return sum(t.numel() for t in load_file(str(folder / lora_io.DIFFUSERS_NAME)).values())


def with_loras(teacher: str, loras: list[tuple[Path, float]]) -> Bundle:
    return Bundle.load(registry.resolve(teacher), loras=[(str(p), w) for p, w in loras])


def base_world_table(lcm_lora: Bundle, teacher: str, extractor, out: Path, num_samples: int) -> list[dict]:
    bundles = {"lcm-lora": lcm_lora, "lcm": Bundle.load(registry.resolve("lcm")),
               "teacher": Bundle.load(registry.resolve(teacher))}
    rows = ([pipeline.Row("lcm-lora", LCM_SAMPLER, n, 1.0) for n in (1, 2, 4)]  # g 1: guidance distilled in
            + [pipeline.Row("lcm", LCM_SAMPLER, n, LCM_GUIDANCE) for n in (1, 2, 4)]
            + [pipeline.Row("teacher", *TEACHER_DEFAULTS)])
    return pipeline.score_rows(bundles, rows, extractor, out, num_samples)["records"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lcm-lora", default="runs/lcm-lora")
    ap.add_argument("--full-lcm-run", default="runs/lcm2", help="run folder of the shipped LCM (for its wall time)")
    ap.add_argument("--teacher", default="teacher")
    ap.add_argument("--style-data", default="runs/lcf/striped-train")
    ap.add_argument("--style-lora", default="runs/style-lora")
    ap.add_argument("--style-steps", type=int, default=600)
    ap.add_argument("--out", default="reports/lora")
    ap.add_argument("--num-samples", type=int, default=256)
    args = ap.parse_args()
    lcm_lora, style_dir, out = Path(args.lcm_lora), Path(args.style_lora), Path(args.out)
    if not (lcm_lora / lora_io.DIFFUSERS_NAME).is_file():
        sys.exit(f"lora_report: {lcm_lora} has no finished LCM-LoRA; run the `lcm distill --lora` line in this "
                 "script's docstring first")
    style_cmd = ["finetune-teacher", "--teacher", args.teacher, "--data", args.style_data, "--out", str(style_dir),
                 "--lora", "16", "--max-steps", str(args.style_steps), "--lr", "5e-4"]
    if not (style_dir / lora_io.DIFFUSERS_NAME).is_file():
        resume = ["--resume"] if (style_dir / "checkpoints").exists() else []
        print("$ lcm " + " ".join(style_cmd + resume), flush=True)
        subprocess.run([sys.executable, "-m", "latentcm.cli", *style_cmd, *resume], check=True)

    extractor = JudgeExtractor.load(registry.resolve("judge"))
    lcm_lora_only = with_loras(args.teacher, [(lcm_lora, 1.0)])
    base = base_world_table(lcm_lora_only, args.teacher, extractor, out, args.num_samples)
    full_params = sum(p.numel() for p in Bundle.load(registry.resolve("lcm")).unet.parameters())
    cost = {"lcm-lora": {"trainable_parameters": lora_parameters(lcm_lora), "minutes": training_minutes(lcm_lora)},
            "lcm": {"trainable_parameters": full_params, "minutes": training_minutes(Path(args.full_lcm_run))}}

    style_judge, tag, _ = style.load_or_train_for(registry.resolve("lcm"), references.default_cache_dir())
    combos = {"lcm-lora": lcm_lora_only}
    for lam_style, lam_lcm in LAMBDAS:
        combos[f"lcm-lora{lam_lcm:g}+style{lam_style:g}"] = with_loras(
            args.teacher, [(lcm_lora, lam_lcm), (style_dir, lam_style)])
    styled = lcf_eval.evaluate_models(combos, extractor, style_judge, out / "style", guidance=1.0,
                                      num_samples=args.num_samples)
    results = {"base_world": base, "cost": cost, "style_combination": styled,
               "style_lora": {"command": "lcm " + " ".join(style_cmd), "minutes": training_minutes(style_dir),
                              "trainable_parameters": lora_parameters(style_dir)},
               "style_judge": tag, "num_samples": args.num_samples, "machine": "2-core CPU (see README)",
               "written": time.strftime("%Y-%m-%d")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    cost = results["cost"]
    lines = ["| model | sampler | steps | FID | KID×10³ | caption score | exact acc. | trainable parameters "
             "| distillation |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["base_world"]:
        c = cost.get(r["model"], {})
        params = f"{c['trainable_parameters']:,}" if c else "-"
        minutes = f"{c['minutes']:.1f} min" if c else "-"
        name = {"lcm-lora": "LCM-LoRA (r = 16)", "lcm": "full LCM (shipped)", "teacher": "teacher"}[r["model"]]
        kid = scoring.kid_text(r) if "kid" in r else "-"
        lines.append(f"| {name} | {r['sampler']} | {r['steps']} | {r['fid']:.1f} | {kid} | {r['caption_score']:.1f} | "
                     f"{r['exact_match']:.1%} | {params} | {minutes} |")
    lines += ["", lcf_eval.markdown(results["style_combination"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
