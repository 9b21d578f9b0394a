"""Sampling throughput, from one run: images/s of the LCM at 1/2/4 steps against the teacher's DDIM at
25 and 50 steps with classifier-free guidance (two UNet passes per step). Each row times the whole
text -> image path (text encoder, sampler, VAE decode) of one batch; best of --repeats after --warmup
untimed runs. Ratios are against the teacher's 50-step row of the same run.

    python benchmarks/bench_sampling.py                       # the shipped lcm and teacher
    python benchmarks/bench_sampling.py --lcm runs/lcm --teacher runs/build/teacher --batch-size 16

With --vs-diffusers it instead times latentcm's LCM sampling against diffusers' LatentConsistencyModelPipeline
built from the very same modules (same weights), interleaved A/B/A/B with the median of --repeats (>= 5), at
batch 1 and 16 and 1/2/4/8 steps, in fp32 and in the fastest opt-in mode (bf16 autocast and channels_last VAE
for both; latentcm also its prompt-encoding LRU), with the max pixel error of each output against fp32 latentcm
(torch.compile is left out: on the 2-core CPU it compiled for minutes and gave no speed-up):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --vs-diffusers --out reports/serve/bench_sampling
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning on shared cores

import torch  # noqa: E402

from latentcm import registry
from latentcm.evaluation.pipeline import Row
from latentcm.bundle import Bundle

PROMPT = "a large red circle on a blue background"
ROWS = (Row("lcm", "lcm", 1, 8.5), Row("lcm", "lcm", 2, 8.5), Row("lcm", "lcm", 4, 8.5),
        Row("teacher", "ddim", 25, 7.5), Row("teacher", "ddim", 50, 7.5))
BASELINE = ROWS[-1]


def best_seconds(bundle: Bundle, row: Row, batch_size: int, repeats: int, warmup: int) -> float:
    """Best wall time of ``repeats`` timed batches after ``warmup`` untimed ones."""
    seeds = list(range(batch_size))
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        bundle.generate([PROMPT] * batch_size, seeds, row.sampler, row.steps, row.guidance)
        if bundle.unet.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lcm", default="lcm", help="Shipped LCM name or LCM folder.")
    ap.add_argument("--teacher", default="teacher", help="Shipped teacher name or teacher folder.")
    ap.add_argument("--batch-size", type=int, default=8, help="Images per timed batch.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed batches per row (best is kept).")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed batches per row first.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    ap.add_argument("--vs-diffusers", action="store_true", help="latentcm against diffusers' LCM pipeline instead.")
    ap.add_argument("--batch-sizes", default="1,16", help="--vs-diffusers: comma-separated batch sizes.")
    ap.add_argument("--steps", default="1,2,4,8", help="--vs-diffusers: comma-separated step counts.")
    ap.add_argument("--modes", default="fp32,serve,fast",
                    help="--vs-diffusers: fp32; serve (channels_last VAE + prompt LRU: `lcm serve`'s defaults); "
                         "fast (serve + bf16 autocast, the fastest opt-in).")
    ap.add_argument("--out", default=None, help="--vs-diffusers: write OUT.json and OUT.md.")
    return ap.parse_args(argv)


def _pipeline(bundle: Bundle):
    """diffusers' LatentConsistencyModelPipeline over the Bundle's own modules (the same weights)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                          unet=bundle.unet, scheduler=LCMScheduler.from_config(bundle.scheduler_config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _set_mode(bundle: Bundle, mode: str) -> None:
    if mode not in ("fp32", "serve", "fast"):
        raise SystemExit(f"unknown mode {mode!r}; choose from fp32, serve, fast")
    bundle.optimize(prompt_cache=0 if mode == "fp32" else 256, channels_last_vae=mode != "fp32",
                    dtype=torch.bfloat16 if mode == "fast" else torch.float32)


def vs_diffusers(args: argparse.Namespace) -> list[dict]:
    """Interleaved latentcm / diffusers timings (median of ``repeats``) and pixel errors against fp32 latentcm."""
    bundle = Bundle.load(registry.resolve(args.lcm)).to(args.device)
    pipe = _pipeline(bundle)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    repeats = max(5, args.repeats)
    rows, reference = [], {}
    for mode in args.modes.split(","):
        _set_mode(bundle, mode)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompts, seeds = [PROMPT] * batch, list(range(batch))
            for steps in [int(s) for s in args.steps.split(",")]:
                def ours():
                    return bundle.generate(prompts, seeds, "lcm", steps, 8.5)

                def theirs():
                    gens = [torch.Generator().manual_seed(s) for s in seeds]
                    with bundle._autocast():
                        out = pipe(prompts, num_inference_steps=steps, guidance_scale=8.5, generator=gens,
                                   output_type="pt").images
                    return out.float() * 2 - 1  # [0, 1] -> [-1, 1]

                outputs, times = {}, {"latentcm": [], "diffusers": []}
                for i in range(repeats + 1):  # the first round is warm-up
                    for name, fn in (("latentcm", ours), ("diffusers", theirs)):
                        sync()
                        t0 = time.perf_counter()
                        outputs[name] = fn()
                        sync()
                        if i:
                            times[name].append(time.perf_counter() - t0)
                if mode == "fp32":
                    reference[(batch, steps)] = outputs["latentcm"]
                ref = reference.get((batch, steps))
                diff = {name: None if ref is None else (out.cpu() - ref.cpu()).abs() * 127.5  # 8-bit levels
                        for name, out in outputs.items()}
                err = {name: None if d is None else round(float(d.max()), 3) for name, d in diff.items()}
                mean = {name: None if d is None else round(float(d.mean()), 4) for name, d in diff.items()}
                med = {name: statistics.median(t) for name, t in times.items()}
                rows.append({"mode": mode, "batch": batch, "steps": steps, "latentcm_s": round(med["latentcm"], 4),
                             "diffusers_s": round(med["diffusers"], 4),
                             "speedup": round(med["diffusers"] / med["latentcm"], 3),
                             "max_pixel_err_latentcm": err["latentcm"], "max_pixel_err_diffusers": err["diffusers"],
                             "mean_pixel_err_latentcm": mean["latentcm"],
                             "latentcm_images_per_s": round(batch / med["latentcm"], 2)})
                r = rows[-1]
                print(f"{mode:5s} batch {batch:2d} steps {steps}: latentcm {r['latentcm_s'] * 1000:8.1f} ms  diffusers "
                      f"{r['diffusers_s'] * 1000:8.1f} ms  diffusers/latentcm {r['speedup']:5.2f}x  max pixel err vs fp32 "
                      f"latentcm: latentcm {r['max_pixel_err_latentcm']}, diffusers {r['max_pixel_err_diffusers']}",
                      flush=True)
    if args.out:
        _write(args, rows, repeats)
    return rows


def _write(args: argparse.Namespace, rows: list[dict], repeats: int) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPU cores ({args.device}), torch threads {torch.get_num_threads()}, shared; " \
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "repeats": repeats, "rows": rows}, indent=2)
                                        + "\n")
    lines = ["# latentcm vs diffusers' LatentConsistencyModelPipeline, same modules and weights\n",
             f"{machine}. Interleaved A/B/A/B, median of {repeats} after one warm-up round; the whole text -> image "
             "path (prompt encoding, LCM sampling, VAE decode) at guidance 8.5, 64x64. `serve` = channels_last VAE for "
             "both and latentcm's prompt-encoding LRU (diffusers has none): the defaults of `lcm serve`; `fast` = "
             "`serve` + bf16 autocast for both (opt-in, `lcm serve --dtype bf16`). Pixel errors are "
             "max |difference| in 8-bit levels against fp32 latentcm of the same batch and steps.\n",
             "| mode | batch | steps | latentcm ms | diffusers ms | diffusers / latentcm | latentcm images/s | "
             "max (mean) pixel err latentcm | max pixel err diffusers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['steps']} | {r['latentcm_s'] * 1000:.1f} | "
                     f"{r['diffusers_s'] * 1000:.1f} | {r['speedup']:.2f}x | {r['latentcm_images_per_s']} | "
                     f"{r['max_pixel_err_latentcm']} ({r['mean_pixel_err_latentcm']}) | {r['max_pixel_err_diffusers']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, and return its rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_diffusers:
        return vs_diffusers(args)
    bundles = {"lcm": Bundle.load(registry.resolve(args.lcm)).to(args.device),
               "teacher": Bundle.load(registry.resolve(args.teacher)).to(args.device)}
    results = []
    for row in ROWS:
        sec = best_seconds(bundles[row.model], row, args.batch_size, args.repeats, args.warmup)
        results.append({"row": row.label.replace("\n", " "), "unet_evals": bundles[row.model].unet_evals_per_image(
            row.sampler, row.steps), "images_per_s": args.batch_size / sec, "seconds": sec})
    base = results[ROWS.index(BASELINE)]["images_per_s"]
    print(f"device {args.device}, batch {args.batch_size}, best of {args.repeats} after {args.warmup} warm-up, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'sampler':34s} {'UNet evals/img':>14s} {'images/s':>10s} {'x teacher-50':>12s}")
    for r in results:
        r["ratio"] = r["images_per_s"] / base
        print(f"{r['row']:34s} {r['unet_evals']:14d} {r['images_per_s']:10.2f} {r['ratio']:12.2f}")
    return results


if __name__ == "__main__":
    main()
