"""Sampling throughput, from one run: images/s of the LCM at 1/2/4 steps against the teacher's DDIM at
25 and 50 steps with classifier-free guidance (two UNet passes per step). Each row times the whole
text -> image path (text encoder, sampler, VAE decode) of one batch; best of --repeats after --warmup
untimed runs. Ratios are against the teacher's 50-step row of the same run.

    python benchmarks/bench_sampling.py                       # the shipped lcm and teacher
    python benchmarks/bench_sampling.py --lcm runs/lcm --teacher runs/build/teacher --batch-size 16

With --vs-diffusers it instead times latentcm's LCM sampling in each mode against diffusers'
LatentConsistencyModelPipeline in fp32 built from the very same modules (same weights), interleaved (diffusers,
then every mode, round after round; the median of --repeats >= 5 after a warm-up round), at batch 1 and 16 and
1/2/4/8 steps, with the max pixel error of each output against fp32 latentcm. Modes (``Bundle.optimize``):

* fp32: nothing changed (identical output expected);
* serve: channels_last VAE and the prompt-encoding LRU (the defaults of ``lcm serve``);
* compile: serve + the UNet channels_last under ``torch.compile`` (``lcm serve --compile``; fp32, compiles
  ~40 s per batch shape on first use, untimed);
* fast: serve + bf16 autocast (``lcm serve --dtype bf16``).

``--judge N`` also samples N held-out prompts at 4 steps in fp32 and in each other mode and scores them with the
judge (attribute accuracy), the accuracy check of the speed-ups:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --vs-diffusers --judge 256 --out reports/serve/bench_sampling
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
    ap.add_argument("--modes", default="fp32,serve,compile,fast",
                    help="--vs-diffusers: comma-separated, from fp32, serve, compile, fast (see above).")
    ap.add_argument("--judge", type=int, default=0, help="--vs-diffusers: judge accuracy on N held-out prompts per mode.")
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


MODES = {  # Bundle.optimize arguments of each mode
    "fp32": {},
    "serve": {"prompt_cache": 256, "channels_last_vae": True},
    "compile": {"prompt_cache": 256, "channels_last_vae": True, "compile_unet": True},
    "fast": {"prompt_cache": 256, "channels_last_vae": True, "dtype": torch.bfloat16},
}
LEVEL = 1 / 255  # one 8-bit level in [0, 1] pixel units


def _bundles(args: argparse.Namespace, modes: list[str]) -> dict[str, Bundle]:
    """One Bundle per mode, each its own copy of the weights (so no mode's layout leaks into another's)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    path = registry.resolve(args.lcm)
    return {m: Bundle.load(path).to(args.device).optimize(**MODES[m]) for m in ["fp32", *modes] if m}


def _time_round(fns: dict, sync) -> tuple[dict, dict]:
    """One call of each function in turn: (outputs, seconds)."""
    outputs, seconds = {}, {}
    for name, fn in fns.items():
        sync()
        t0 = time.perf_counter()
        outputs[name] = fn()
        sync()
        seconds[name] = time.perf_counter() - t0
    return outputs, seconds


def _own_timesteps(bundle, steps: int) -> list[int]:
    """The timesteps latentcm samples ``bundle`` on at ``steps`` (its sampling.json's schedule), for diffusers'
    ``timesteps=`` argument: a comparison on diffusers' own grid selection would compare two schedules."""
    from latentcm.sampling.student import inference_timesteps
    from latentcm.schedules import train_timesteps

    options = bundle.sampling_options(steps=steps)
    return inference_timesteps(options.schedule, steps, train_timesteps(bundle.scheduler_config),
                               bundle.original_inference_steps).tolist()


def vs_diffusers(args: argparse.Namespace) -> dict:
    """Interleaved timings of every mode and of diffusers' fp32 pipeline (median of ``repeats``), pixel errors
    against fp32 latentcm in [0, 1] units; with ``--judge`` the judge's accuracy per mode."""
    modes = list(dict.fromkeys(args.modes.split(",")))
    bundles = _bundles(args, modes)
    pipe = _pipeline(bundles["fp32"])  # shares the fp32 bundle's modules, which no mode changes
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    repeats, rows = max(5, args.repeats), []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        for steps in [int(s) for s in args.steps.split(",")]:
            timesteps = _own_timesteps(bundles["fp32"], steps)  # diffusers samples the same timesteps as latentcm

            def theirs():
                gens = [torch.Generator().manual_seed(s) for s in seeds]
                out = pipe(prompts, timesteps=timesteps, guidance_scale=8.5, generator=gens,
                           output_type="pt").images
                return out.float() * 2 - 1  # [0, 1] -> [-1, 1]

            fns = {"diffusers-fp32": theirs, **{m: (lambda b=bundles[m]: b.generate(prompts, seeds, "lcm", steps, 8.5))
                                                for m in modes}}
            times = {name: [] for name in fns}
            for i in range(repeats + 1):  # round 0 warms up (and compiles)
                outputs, seconds = _time_round(fns, sync)
                for name, sec in seconds.items():
                    if i:
                        times[name].append(sec)
            ref = outputs["fp32"] if "fp32" in outputs else bundles["fp32"].generate(prompts, seeds, "lcm", steps, 8.5)
            base = statistics.median(times["diffusers-fp32"])
            for name in fns:
                err = (outputs[name].cpu().float() - ref.cpu().float()).abs() / 2  # [-1, 1] -> [0, 1] units
                med = statistics.median(times[name])
                rows.append({"mode": name, "batch": batch, "steps": steps, "seconds": round(med, 4),
                             "diffusers_fp32_s": round(base, 4), "speedup_vs_diffusers_fp32": round(base / med, 3),
                             "max_pixel_err": round(float(err.max()), 5), "mean_pixel_err": round(float(err.mean()), 6),
                             "images_per_s": round(batch / med, 2)})
                r = rows[-1]
                print(f"batch {batch:2d} steps {steps} {name:15s} {med * 1000:8.1f} ms  diffusers-fp32 / this "
                      f"{r['speedup_vs_diffusers_fp32']:5.2f}x  max pixel err vs fp32 latentcm {r['max_pixel_err']:.5f} "
                      f"({r['max_pixel_err'] / LEVEL:.2f} levels)", flush=True)
    result = {"rows": rows, "repeats": repeats, "judge": _judge(bundles, args.judge) if args.judge else None}
    if args.out:
        _write(args, result)
    return result


def _judge(bundles: dict[str, Bundle], count: int, steps: int = 4, guidance: float = 8.5) -> dict:
    """Attribute accuracy (%) of each mode's images of ``count`` held-out prompts, scored by the shipped judge."""
    from latentcm.evaluation.extractors import JudgeExtractor
    from latentcm.evaluation.references import heldout_prompts
    from latentcm.evaluation.scoring import attribute_accuracy
    from latentcm.images import from_pixels, to_pixels

    judge = JudgeExtractor.load(registry.resolve("judge"))
    prompts, wanted = zip(*heldout_prompts(count))
    scores = {}
    for mode, bundle in bundles.items():
        images = torch.cat([bundle.generate(list(prompts[i:i + 16]), list(range(i, min(i + 16, count))), "lcm",
                                            steps, guidance).cpu() for i in range(0, count, 16)])
        saved = from_pixels(to_pixels(images))  # through 8-bit pixels, as a user saves them
        scores[mode] = {k: 100 * v for k, v in attribute_accuracy(judge.predict(saved), list(wanted)).items()}
        print(f"judge, {count} held-out prompts, {steps} steps, {mode:8s}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in scores[mode].items()), flush=True)
    return {"count": count, "steps": steps, "guidance": guidance, "accuracy": scores}


def _write(args: argparse.Namespace, result: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPU cores ({args.device}), torch threads {torch.get_num_threads()}, shared; " \
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
    lines = ["# latentcm against diffusers' LatentConsistencyModelPipeline in fp32, same modules and weights\n",
             f"{machine}. `python benchmarks/bench_sampling.py --vs-diffusers --judge {args.judge} --out {args.out}`. "
             f"Interleaved round by round (diffusers fp32, then each mode), median of {result['repeats']} rounds after a "
             "warm-up round; the whole text -> image path (prompt encoding, LCM sampling, VAE decode) at guidance 8.5, "
             "64x64. Modes: `fp32` unchanged; `serve` channels_last VAE + prompt-encoding LRU (`lcm serve`'s defaults); "
             "`compile` serve + channels_last UNet under torch.compile (`lcm serve --compile`, fp32); `fast` serve + "
             "bf16 autocast (`lcm serve --dtype bf16`). Pixel errors: max |difference| against fp32 latentcm of the "
             "same batch and steps, in [0, 1] pixel units (one 8-bit level = 0.0039).\n",
             "| mode | batch | steps | ms | diffusers fp32 ms | diffusers fp32 / this | images/s | max pixel err | "
             "mean pixel err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['steps']} | {r['seconds'] * 1000:.1f} | "
                     f"{r['diffusers_fp32_s'] * 1000:.1f} | {r['speedup_vs_diffusers_fp32']:.2f}x | {r['images_per_s']} | "
                     f"{r['max_pixel_err']:.5f} | {r['mean_pixel_err']:.6f} |")
    judge = result.get("judge")
    if judge:
        attrs = list(next(iter(judge["accuracy"].values())))
        lines += ["", f"Judge accuracy (%), {judge['count']} held-out prompts, {judge['steps']} steps, guidance "
                  f"{judge['guidance']}, seeds 0..{judge['count'] - 1}:", "",
                  "| mode | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs)]
        for mode, acc in judge["accuracy"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{acc[a]:.1f}" for a in attrs) + " |")
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
