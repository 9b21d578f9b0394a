"""Sampling throughput, from one run: images/s of the LCM at 1/2/4 steps against the teacher's DDIM at
25 and 50 steps with classifier-free guidance (two UNet passes per step). Each row times the whole
text -> image path (text encoder, sampler, VAE decode) of one batch; best of --repeats after --warmup
untimed runs. Ratios are against the teacher's 50-step row of the same run.

    python benchmarks/bench_sampling.py                       # the shipped lcm and teacher
    python benchmarks/bench_sampling.py --lcm runs/lcm --teacher runs/build/teacher --batch-size 16

With --vs-diffusers it instead times latentcm's LCM sampling in each mode against two baselines of diffusers'
LatentConsistencyModelPipeline built from the very same weights, both sampling the LCM's own timesteps (its
sampling.json's schedule, passed as ``timesteps=``): ``diffusers-fp32`` (the pipeline as loaded) and
``diffusers-compile`` (UNet and VAE channels_last, ``pipe.unet = torch.compile(pipe.unet)``: what a skilled user
does). Rounds are interleaved (every baseline and mode once per round, the order rotated each round; a warm-up
round first, untimed, which compiles); each ratio is baseline time / mode time within one round, reported as the
median over --repeats >= 5 rounds with its range. Batch 1 and 16, 1/2/4/8 steps; the max and mean pixel error of
each output against fp32 latentcm. Modes (``Bundle.optimize``):

* fp32: nothing changed (identical output expected);
* serve: channels_last VAE and the prompt-encoding LRU (the defaults of ``lcm serve``);
* compile: serve + the UNet channels_last under ``torch.compile`` (``lcm serve --compile``; fp32, compiles
  ~40 s per batch shape on first use, untimed);
* fast: serve + bf16 autocast (``lcm serve --dtype bf16``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --vs-diffusers --repeats 9 --batch-sizes 1,16 \
        --steps 1,4 --out reports/serve/bench_sampling

``--quality N`` is the quality check of the modes: N varied held-out prompts (``heldout_prompts``, seeds 0..N-1,
4 steps, g = 8.5) sampled in fp32 and in each mode; per mode the max and mean pixel error against fp32, the
judge's attribute accuracy and KID (``evaluation.scoring.score``, saved as 8-bit images), and the paired
difference to fp32 (KID and the share of images with colour, background and shape all right; 95% bootstrap over
prompts, ``evaluation.intervals``):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --quality 512 --out reports/serve/quality
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning on shared cores

import numpy as np  # noqa: E402
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
    ap.add_argument("--repeats", type=int, default=3,
                    help="Timed batches per row (best is kept); --vs-diffusers: timed rounds (at least 5).")
    ap.add_argument("--warmup", type=int, default=1, help="Untimed batches per row first.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    ap.add_argument("--vs-diffusers", action="store_true", help="latentcm against diffusers' LCM pipeline instead.")
    ap.add_argument("--batch-sizes", default="1,16", help="--vs-diffusers: comma-separated batch sizes.")
    ap.add_argument("--steps", default="1,2,4,8", help="--vs-diffusers: comma-separated step counts.")
    ap.add_argument("--modes", default="fp32,serve,compile,fast",
                    help="--vs-diffusers: comma-separated, from fp32, serve, compile, fast (see above).")
    ap.add_argument("--quality", type=int, default=0,
                    help="Instead: each mode's pixel error, judge accuracy and KID on N held-out prompts (see above).")
    ap.add_argument("--out", default=None, help="--vs-diffusers, --quality: write OUT.json and OUT.md.")
    return ap.parse_args(argv)


def _pipeline(bundle: Bundle, compiled: bool = False):
    """diffusers' LatentConsistencyModelPipeline over the Bundle's own modules (the same weights); ``compiled``:
    UNet and VAE channels_last and ``torch.compile(pipe.unet)``, as diffusers' speed-up guide does."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                          unet=bundle.unet, scheduler=LCMScheduler.from_config(bundle.scheduler_config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet)
    return pipe


MODES = {  # Bundle.optimize arguments of each mode
    "fp32": {},
    "serve": {"prompt_cache": 256, "channels_last_vae": True},
    "compile": {"prompt_cache": 256, "channels_last_vae": True, "compile_unet": True},
    "fast": {"prompt_cache": 256, "channels_last_vae": True, "dtype": torch.bfloat16},
}
BASELINES = ("diffusers-fp32", "diffusers-compile")
HEADLINE = ("colour", "background", "shape")  # --quality: the attributes every prompt names
LEVEL = 1 / 255  # one 8-bit level in [0, 1] pixel units


def _modes(args: argparse.Namespace) -> list[str]:
    modes = list(dict.fromkeys(m for m in args.modes.split(",") if m))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return modes


def _bundles(args: argparse.Namespace, modes: list[str]) -> dict[str, Bundle]:
    """One Bundle per mode, each its own copy of the weights (so no mode's layout leaks into another's)."""
    path = registry.resolve(args.lcm)
    return {m: Bundle.load(path).to(args.device).optimize(**MODES[m]) for m in dict.fromkeys(["fp32", *modes])}


def _time_round(fns: dict, sync, first: int) -> tuple[dict, dict]:
    """One call of each function, starting at the ``first``-th and wrapping around: (outputs, seconds)."""
    names = list(fns)
    outputs, seconds = {}, {}
    for name in names[first % len(names):] + names[:first % len(names)]:
        sync()
        t0 = time.perf_counter()
        outputs[name] = fns[name]()
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


def _diffusers_fn(pipe, prompts: list[str], seeds: list[int], timesteps: list[int]):
    def run():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(prompts, timesteps=timesteps, guidance_scale=8.5, generator=gens, output_type="pt").images
        return out.float() * 2 - 1  # [0, 1] -> [-1, 1]
    return run


def _ratio(base: list[float], mine: list[float]) -> dict:
    """Per round base / mine: the median and the range over rounds."""
    r = [b / m for b, m in zip(base, mine)]
    return {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


def _setting_rows(fns: dict, bundles: dict, batch: int, steps: int, repeats: int, sync) -> list[dict]:
    """Interleaved rounds of every baseline and mode at one batch size and step count; one row each."""
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    times = {name: [] for name in fns}
    for i in range(repeats + 1):  # round 0 warms up (and compiles)
        outputs, seconds = _time_round(fns, sync, i)
        for name, sec in seconds.items():
            if i:
                times[name].append(sec)
    ref = outputs["fp32"] if "fp32" in outputs else bundles["fp32"].generate(prompts, seeds, "lcm", steps, 8.5)
    rows = []
    for name in fns:
        err = (outputs[name].cpu().float() - ref.cpu().float()).abs() / 2  # [-1, 1] -> [0, 1] units
        med = statistics.median(times[name])
        rows.append({"mode": name, "batch": batch, "steps": steps, "seconds": round(med, 4),
                     "images_per_s": round(batch / med, 2), "max_pixel_err": round(float(err.max()), 5),
                     "mean_pixel_err": round(float(err.mean()), 6),
                     **{f"vs_{b}": _ratio(times[b], times[name]) for b in BASELINES}})
        r = rows[-1]
        print(f"batch {batch:2d} steps {steps} {name:17s} {med * 1000:8.1f} ms  "
              + "  ".join(f"{b} / this {r[f'vs_{b}']['median']:5.2f}x" for b in BASELINES)
              + f"  max pixel err vs fp32 latentcm {r['max_pixel_err']:.5f}", flush=True)
    return rows


def vs_diffusers(args: argparse.Namespace) -> dict:
    """Interleaved timings of every mode and of both diffusers baselines on the LCM's own timesteps; per row the
    median time, the per-round ratios to each baseline (median and range), pixel errors against fp32 latentcm."""
    modes = _modes(args)
    bundles = _bundles(args, modes)
    pipes = {"diffusers-fp32": _pipeline(bundles["fp32"]),  # shares the fp32 bundle's modules, which no mode changes
             "diffusers-compile": _pipeline(Bundle.load(registry.resolve(args.lcm)).to(args.device), compiled=True)}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    repeats, rows = max(5, args.repeats), []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        for steps in [int(s) for s in args.steps.split(",")]:
            timesteps = _own_timesteps(bundles["fp32"], steps)  # diffusers samples the same timesteps as latentcm
            fns = {name: _diffusers_fn(pipe, prompts, seeds, timesteps) for name, pipe in pipes.items()}
            fns.update({m: (lambda b=bundles[m]: b.generate(prompts, seeds, "lcm", steps, 8.5)) for m in modes})
            rows += _setting_rows(fns, bundles, batch, steps, repeats, sync)
    result = {"rows": rows, "repeats": repeats, "summary": _summary(rows, modes)}
    if args.out:
        _write(args, result, _timing_markdown(args, result))
    return result


def _summary(rows: list[dict], modes: list[str]) -> dict:
    """mode -> baseline -> the lowest and highest median ratio over the batch sizes and step counts."""
    out = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {b: [min(r[f"vs_{b}"]["median"] for r in mine), max(r[f"vs_{b}"]["median"] for r in mine)]
                     for b in BASELINES}
    return out


def _mode_images(bundle: Bundle, prompts: list[str], steps: int, guidance: float) -> torch.Tensor:
    return torch.cat([bundle.generate(prompts[i:i + 16], list(range(i, min(i + 16, len(prompts)))), "lcm", steps,
                                      guidance).cpu().float() for i in range(0, len(prompts), 16)])


def quality(args: argparse.Namespace, steps: int = 4, guidance: float = 8.5) -> dict:
    """Each mode's images of ``args.quality`` held-out prompts against fp32's: pixel errors, the judge's accuracy and
    KID (``score``, on the 8-bit images a user saves), and paired differences to fp32 with 95% intervals."""
    from latentcm.evaluation import intervals
    from latentcm.evaluation.extractors import JudgeExtractor
    from latentcm.evaluation.references import heldout_prompts, reference_set
    from latentcm.evaluation.scoring import KID_SCALE, judged_values, model_images, rounded, score
    from latentcm.images import to_pixels

    modes = _modes(args)
    bundles = _bundles(args, modes)
    extractor = JudgeExtractor.load(registry.resolve("judge"))
    reference = reference_set(extractor)
    prompts, wanted = (list(x) for x in zip(*heldout_prompts(args.quality)))
    images = {m: _mode_images(b, prompts, steps, guidance) for m, b in bundles.items()}
    scale = float(np.sqrt(np.mean(reference.features.astype(np.float64) ** 2))) or 1.0
    features, exact, out = {}, {}, {}
    for mode, x in images.items():
        pixels = to_pixels(x)
        err = (x - images["fp32"]).abs() / 2  # [-1, 1] -> [0, 1] units
        s = rounded(score(pixels, prompts, extractor, reference, wanted=wanted))
        seen = {k: judged_values(pixels, extractor, k) for k in HEADLINE}
        features[mode] = extractor.features(model_images(pixels)).astype(np.float64) / scale
        exact[mode] = np.array([all(seen[k][i] == w[k] for k in HEADLINE if k in w) for i, w in enumerate(wanted)],
                               np.float64)
        out[mode] = {"max_pixel_err": round(float(err.max()), 5), "mean_pixel_err": round(float(err.mean()), 6),
                     "changed_pixels_8bit": round(float((pixels != to_pixels(images["fp32"])).mean()), 5),
                     "kid": s["kid"], "attribute_accuracy": s["attribute_accuracy"], "exact_match": s["exact_match"],
                     "headline_right": round(float(exact[mode].mean()), 4)}
        print(f"quality, {len(prompts)} held-out prompts, {mode:8s}: max pixel err {out[mode]['max_pixel_err']:.5f}, "
              f"mean {out[mode]['mean_pixel_err']:.6f}, KID x10^3 {s['kid']}, colour/background/shape right "
              f"{out[mode]['headline_right']}", flush=True)
    draws = intervals.draw(len(prompts), len(reference.features), seed=0)
    kid = intervals.intervals(features, reference.features.astype(np.float64) / scale, "kid", draws, baseline="fp32")
    match = intervals.intervals(exact, None, "mean", draws, baseline="fp32")
    for mode in out:
        out[mode]["kid_diff"] = [round(KID_SCALE * v, 2) for v in [kid[mode]["diff"], *kid[mode]["diff_ci"]]]
        out[mode]["headline_right_diff"] = [round(v, 4) for v in [match[mode]["diff"], *match[mode]["diff_ci"]]]
    result = {"count": len(prompts), "steps": steps, "guidance": guidance, "modes": out}
    if args.out:
        _write(args, result, _quality_markdown(args, result))
    return result


def _machine(args: argparse.Namespace) -> str:
    return (f"{os.cpu_count()} CPU cores ({args.device}), torch threads {torch.get_num_threads()}, shared with a "
            f"background training job; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _write(args: argparse.Namespace, result: dict, markdown: list[str]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": _machine(args), **result}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(markdown) + "\n")


def _fmt(r: dict) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]"


def _timing_markdown(args: argparse.Namespace, result: dict) -> list[str]:
    lines = ["| mode | batch | steps | ms | images/s | diffusers fp32 / this | diffusers compile / this | "
             "max pixel err | mean pixel err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['steps']} | {r['seconds'] * 1000:.1f} | {r['images_per_s']} | "
                     f"{_fmt(r['vs_diffusers-fp32'])} | {_fmt(r['vs_diffusers-compile'])} | {r['max_pixel_err']:.5f} | "
                     f"{r['mean_pixel_err']:.6f} |")
    summary = ["", "Median ratios over the batch sizes and step counts above, lowest to highest (baseline time / mode "
               "time):", "",
               "| mode | diffusers fp32 / this | diffusers compile / this |", "|---|---|---|"]
    summary += [f"| {m} | {s['diffusers-fp32'][0]:.2f}-{s['diffusers-fp32'][1]:.2f}x | "
                f"{s['diffusers-compile'][0]:.2f}-{s['diffusers-compile'][1]:.2f}x |" for m, s in result["summary"].items()]
    command = (f"OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --vs-diffusers --repeats {args.repeats} "
               f"--batch-sizes {args.batch_sizes} --steps {args.steps} --modes {args.modes} --out {args.out}")
    return [_TIMING_HEAD[0], f"Command: `{command}`; {_machine(args)}. " + _TIMING_HEAD[1],
            f"Rounds: {result['repeats']} timed after one warm-up round.", ""] + lines + summary


_TIMING_HEAD = [
    "# latentcm against diffusers' LatentConsistencyModelPipeline (fp32, and channels_last + torch.compile)\n",
    "Both diffusers baselines use the same "
    "weights and sample the LCM's own timesteps (`timesteps=`). `diffusers-fp32`: the pipeline as loaded; "
    "`diffusers-compile`: UNet and VAE channels_last, `pipe.unet = torch.compile(pipe.unet)`. Modes: `fp32` "
    "unchanged; `serve` channels_last VAE + prompt-encoding LRU (`lcm serve`'s defaults); `compile` serve + "
    "channels_last UNet under torch.compile (`lcm serve --compile`, fp32); `fast` serve + bf16 autocast (`lcm serve "
    "--dtype bf16`). Every row times the whole text -> image path at guidance 8.5, 64x64. Rounds are interleaved "
    "(each baseline and mode once per round, the order rotated each round); a ratio is baseline time / mode time in "
    "one round, given as the median over rounds [min, max]. Pixel errors: |difference| against fp32 latentcm of the "
    "same batch and steps, in [0, 1] units (one 8-bit level = 0.0039).\n"]


def _quality_markdown(args: argparse.Namespace, result: dict) -> list[str]:
    modes = result["modes"]
    attrs = list(next(iter(modes.values()))["attribute_accuracy"])
    lines = ["# Quality of the sampling modes against fp32\n",
             f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sampling.py --quality {result['count']} --out "
             f"{args.out}`; {_machine(args)}. The LCM at {result['steps']} steps, g = {result['guidance']}, on "
             f"{result['count']} held-out prompts (`heldout_prompts`, varied templates and attributes), seeds "
             f"0..{result['count'] - 1}, every mode on the same prompts and seeds. Pixel errors: |mode - fp32| in [0, 1] "
             "units (one 8-bit level = 0.0039), max and mean over every pixel; `8-bit changed`: share of saved 8-bit "
             "values that differ. Judge and KID (x10^3, against the real images of the prompt-scenes reference) are "
             "`evaluation.scoring.score` on the saved 8-bit images. Paired differences to fp32: 95% percentile "
             "bootstrap over prompts (and the reference), `evaluation.intervals`.\n",
             "| mode | max pixel err | mean pixel err | 8-bit changed | KID | KID - fp32 [95%] | colour, background, "
             "shape right | the same - fp32 [95%] | exact match | " + " | ".join(attrs) + " |",
             "|---|" + "---|" * (8 + len(attrs))]
    for mode, q in modes.items():
        kd, em = q["kid_diff"], q["headline_right_diff"]
        lines.append(f"| {mode} | {q['max_pixel_err']:.5f} ({q['max_pixel_err'] / LEVEL:.0f} levels) | "
                     f"{q['mean_pixel_err']:.6f} | {100 * q['changed_pixels_8bit']:.2f}% | {q['kid']} | "
                     f"{kd[0]:+.2f} [{kd[1]:+.2f}, {kd[2]:+.2f}] | {100 * q['headline_right']:.1f}% | "
                     f"{100 * em[0]:+.1f} [{100 * em[1]:+.1f}, {100 * em[2]:+.1f}] | {100 * q['exact_match']:.1f}% | "
                     + " | ".join(f"{100 * q['attribute_accuracy'][a]:.1f}" for a in attrs) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print the table, and return its rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality:
        return quality(args)
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
