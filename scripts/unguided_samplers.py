"""Judge accuracy without guidance (g = 1) under different samplers: is the teacher ODE's background drop at
g = 1 a property of the unguided model, or of deterministic sampling?

    python scripts/unguided_samplers.py ROW [ROW ...] [--num-samples 1000] [--guidance 1] [--out FILE.json]
        [--cache SWEEP/samples]

ROW is one of
  teacher:ode:STEPS     the teacher's guided ODE as ``lcm ablate guidance`` samples it (DDIM trailing, our sampler);
  teacher:ddpm:STEPS    the teacher through diffusers' own StableDiffusionPipeline with a DDPMScheduler
                        (ancestral sampling, trailing timesteps), the same initial noise per image;
  teacher:diffusers-ddim:STEPS   the same pipeline with a DDIMScheduler (a cross-check of the ode row);
  MODEL:lcm:STEPS       an LCM with LCM Algorithm 3 (re-noises with fresh noise before each step after the first);
  MODEL:lcm-km:STEPS    the same with keep-means re-noising (each channel's mean from the step's noise estimate);
  MODEL:lcm-at:T1-T2-.. the same on the given timesteps (descending, within the schedule), e.g.
                        999-249-149-49: how late re-noising starts, at the same number of steps;
  MODEL:tcd:STEPS:GAMMA an LCM with TCD sampling at stochasticity GAMMA (0: deterministic, the DDIM-like
                        sampler that follows one ODE trajectory);
  teacher:exact-cm:STEPS LCM Algorithm 3 with an *exact* consistency function in place of an LCM: from each of the
                        shipped LCM's STEPS timesteps the teacher's ODE row is solved to t = 0 (DDIM on the points
                        of its trailing 50-step grid below t), then re-noised with the LCM rows' own step noise.
                        What a perfectly distilled LCM would give under Algorithm 3; 1 step is the ODE row itself;
  teacher:exact-cm-km:STEPS the same with keep-means re-noising (``lcm generate --renoise keep-means``);
  MODEL:handoff:T       the teacher's ODE row from t = 999 down to T (its trailing grid, then one DDIM step to T),
                        then the LCM's Algorithm 3 from that state on T and its 4-step refine timesteps below T:
                        the noise level at which the LCM's output departs from the ODE's;
  MODEL:takeover:T      the reverse: the LCM's Algorithm 3 on its 4-step refine timesteps above T, its last
                        prediction re-noised to T with that step's own noise, then the teacher's ODE row from T to
                        0: whether the ODE, given the LCM's own re-noised states, keeps the LCM's background.
MODEL may be FIRST+REST: the LCM REST with FIRST's UNet at its first step (t = 999), e.g. a first-step model
paired with the shipped LCM's refining steps.

Prompts and seeds are ``lcm ablate guidance``'s (held-out captions, image i from seed i), so the ode row is
that sweep's g = 1 row. Every row is scored by ``scoring.score`` (prompt-scenes reference, KID x 10^3), and its
background and shape accuracy are compared with the FIRST row's on the same prompts and seeds: a paired 95%
percentile bootstrap interval over prompts of the difference in points (``--resamples``). Writes a JSON file
and prints a markdown table.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.evaluation import pipeline, references, scoring
from latentcm.evaluation.generation import generate_cached
from latentcm.evaluation.extractors import JudgeExtractor
from latentcm.images import from_pixels, save_grid, to_pixels
from latentcm.models.denoiser import Denoiser
from latentcm.sampling.lcm import per_image_noise, renoise, sample_lcm
from latentcm.sampling.student import inference_timesteps
from latentcm.sampling.teacher import initial_latents
from latentcm.solvers import ddim_step, guide

ATTRIBUTES = ("background", "shape")
ODE_STEPS = 50          # the ODE row's DDIM trailing steps (``lcm ablate guidance``)
LCM_GRID_POINTS = 20    # the shipped LCM's skipping grid (k = 50), whose refine timesteps exact-cm rows use
BATCH = 32
GRID_COLS = 8           # --grid: images shown per row


def parse_row(text: str) -> dict:
    parts = text.split(":")
    kinds = {"ode": 3, "ddpm": 3, "diffusers-ddim": 3, "lcm": 3, "lcm-km": 3, "lcm-at": 3, "tcd": 4, "exact-cm": 3,
             "exact-cm-km": 3, "handoff": 3,
             "takeover": 3}
    if len(parts) < 3 or parts[1] not in kinds or len(parts) != kinds[parts[1]]:
        sys.exit(f"error: a row is teacher:ode|ddpm|diffusers-ddim|exact-cm|exact-cm-km:STEPS, MODEL:lcm|lcm-km:STEPS, "
                 f"MODEL:lcm-at:T1-T2-..., MODEL:handoff:T, MODEL:takeover:T or MODEL:tcd:STEPS:GAMMA, got {text!r}")
    try:
        timesteps = [int(t) for t in parts[2].split("-")] if parts[1] == "lcm-at" else None
        return {"model": parts[0], "kind": parts[1], "steps": len(timesteps) if timesteps else int(parts[2]),
                "timesteps": timesteps, "gamma": float(parts[3]) if parts[1] == "tcd" else None}
    except ValueError:
        sys.exit(f"error: STEPS and timesteps are integers and GAMMA a number, got {text!r}")


def diffusers_images(bundle: Bundle, kind: str, prompts: list[str], seeds: list[int], steps: int,
                     guidance: float) -> np.ndarray:
    """The teacher through diffusers' StableDiffusionPipeline (trailing timesteps), our initial noise per image;
    the ancestral noise of the DDPM steps comes from one generator per batch, seeded by its first image."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    config = {k: v for k, v in bundle.scheduler_config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    scheduler = (DDPMScheduler if kind == "ddpm" else DDIMScheduler).from_config(config)
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                                   unet=bundle.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    o = bundle.sampling_options(None, sampler="ddim-trailing", steps=steps, guidance=guidance)
    height, width = o.height, o.width
    latents = initial_latents(seeds, bundle.latent_shape(height, width))
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=height,
               width=width, output_type="np", generator=torch.Generator().manual_seed(seeds[0])).images
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)  # [B, H, W, 3]


class TeacherODE:
    """The teacher's guided ODE as the ode row solves it: DDIM on the trailing 50-step grid (999, 979, ..., 19)."""

    def __init__(self, bundle: Bundle, prompts: list[str], guidance: float):
        self.denoiser = Denoiser(bundle.unet, bundle.scheduler_config)
        self.table = self.denoiser.alpha_bar
        self.grid = list(range(len(self.table) - 1, 0, -len(self.table) // ODE_STEPS))
        self.cond, self.uncond = bundle.encode_prompts(prompts), bundle.encode_uncond(len(prompts))
        self.guidance = guidance

    def x0_eps(self, x, t):  # the guided teacher's (x0, eps): both affine in its output at fixed x (LCM Eq. 6)
        c = self.denoiser(x, t, self.cond)
        if self.guidance == 1:
            return c
        u = self.denoiser(x, t, self.uncond)
        return tuple(guide(a, b, self.guidance - 1) for a, b in zip(c, u))

    def solve(self, x: torch.Tensor, start: int, points: list[int]) -> torch.Tensor:
        """x at ``start`` carried by DDIM steps through ``points`` (descending, below ``start``)."""
        t0 = torch.full((len(x),), start, dtype=torch.long)
        for s, t in zip([start, *points], points):
            x = ddim_step(x, torch.full_like(t0, s), torch.full_like(t0, t), self.x0_eps, alpha_bar=self.table)
        return x

    def to_zero(self, x: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
        """f*(x, t): the ODE from t down the grid, then its x0 at the last point."""
        points = [t for t in self.grid if t < int(t_batch[0])]
        x = self.solve(x, int(t_batch[0]), points)
        return self.x0_eps(x, torch.full_like(t_batch, points[-1] if points else int(t_batch[0])))[0]


def exact_cm_images(bundle: Bundle, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    renoise: str = "fresh") -> np.ndarray:
    """LCM Algorithm 3 whose consistency function is the teacher's guided ODE itself (DDIM on the trailing 50-step
    grid, the ODE row's, from t to 0), on the shipped LCM's refine timesteps and the LCM rows' per-seed noise."""
    o = bundle.sampling_options(None, sampler="ddim-trailing", steps=ODE_STEPS, guidance=guidance)
    ode = TeacherODE(bundle, prompts, guidance)
    noise_fn = per_image_noise(seeds, bundle.latent_shape(o.height, o.width))
    ts = inference_timesteps("refine", steps, len(ode.table), LCM_GRID_POINTS)
    with torch.no_grad():
        return to_pixels(bundle.decode(sample_lcm(ode.to_zero, noise_fn(-1), ts, noise_fn=noise_fn,
                                                  alpha_bar=ode.table, keep_means=renoise == "keep-means")))


def handoff_images(teacher: Bundle, lcm: Bundle, prompts: list[str], seeds: list[int], t_star: int,
                   guidance: float) -> np.ndarray:
    """The ODE row's trajectory (same initial noise) down to t_star, then the LCM's Algorithm 3 from there on
    t_star and its 4-step refine timesteps below it."""
    o = teacher.sampling_options(None, sampler="ddim-trailing", steps=ODE_STEPS, guidance=guidance)
    ode = TeacherODE(teacher, prompts, guidance)
    noise = initial_latents(seeds, teacher.latent_shape(o.height, o.width))  # the ode row's own start
    with torch.no_grad():
        x = ode.solve(noise, ode.grid[0], [t for t in ode.grid if t > t_star] + [t_star])
    below = [t for t in inference_timesteps("refine", 4, len(ode.table), LCM_GRID_POINTS) if t < t_star]
    return to_pixels(lcm.generate(prompts, seeds, "lcm", 1 + len(below), guidance, latents=x,
                                  timesteps=[t_star, *below]))


def takeover_images(teacher: Bundle, lcm: Bundle, prompts: list[str], seeds: list[int], t_star: int,
                    guidance: float) -> np.ndarray:
    """The LCM row's Algorithm 3 on its refine timesteps above t_star, its last prediction re-noised to t_star with
    the step noise the LCM row draws there, then the ODE row's DDIM from t_star to 0 (``TeacherODE.to_zero``)."""
    o = teacher.sampling_options(None, sampler="ddim-trailing", steps=ODE_STEPS, guidance=guidance)
    ode = TeacherODE(teacher, prompts, guidance)
    above = [t for t in inference_timesteps("refine", 4, len(ode.table), LCM_GRID_POINTS) if t > t_star]
    noise_fn = per_image_noise(seeds, teacher.latent_shape(o.height, o.width))
    with torch.no_grad():
        x0 = lcm.sample_latents(prompts, seeds, "lcm", len(above), guidance, timesteps=above)
        x = renoise(x0, t_star, noise_fn(len(above) - 1), ode.table)
        return to_pixels(teacher.decode(ode.to_zero(x, torch.full((len(x),), t_star, dtype=torch.long))))


def sample(bundle: Bundle, row: dict, prompts: list[str], guidance: float, cache: Path | None,
           teacher: Bundle | None = None) -> np.ndarray:
    if cache is not None and row["kind"] == "ode":  # the sweep's own cache (``lcm ablate guidance --out D``: D/samples)
        return generate_cached(bundle, pipeline.Row(row["model"], "ddim-trailing", row["steps"], guidance), prompts,
                               0, cache)[0]
    images = []
    for i in range(0, len(prompts), BATCH):
        batch = prompts[i:i + BATCH]
        seeds = list(range(i, i + len(batch)))
        if row["kind"] in ("ddpm", "diffusers-ddim"):
            images.append(diffusers_images(bundle, row["kind"], batch, seeds, row["steps"], guidance))
            continue
        if row["kind"] in ("exact-cm", "exact-cm-km"):
            renoise = "keep-means" if row["kind"] == "exact-cm-km" else "fresh"
            images.append(exact_cm_images(bundle, batch, seeds, row["steps"], guidance, renoise))
            continue
        if row["kind"] in ("handoff", "takeover"):
            make = handoff_images if row["kind"] == "handoff" else takeover_images
            images.append(make(teacher, bundle, batch, seeds, row["steps"], guidance))
            continue
        sampler = {"ode": "ddim-trailing"}.get(row["kind"], "lcm")
        x = bundle.generate(batch, seeds, sampler, row["steps"], guidance, gamma=row["gamma"],
                            timesteps=row["timesteps"], renoise="keep-means" if row["kind"] == "lcm-km" else None)
        images.append(to_pixels(x))
    return np.concatenate(images)


class FirstStepUNet(torch.nn.Module):
    """Two UNets as one: ``first`` at timesteps >= ``gate`` (the first step of the refine schedule, t = 999),
    ``rest`` below; every other attribute (config, dtype, ...) is ``rest``'s. A probe of a first-step-only model."""

    def __init__(self, first: torch.nn.Module, rest: torch.nn.Module, gate: int = 999):
        super().__init__()
        self.first, self.rest, self.gate = first, rest, gate

    def forward(self, z, t, *args, **kwargs):
        t_min = int(torch.as_tensor(t).min())
        return (self.first if t_min >= self.gate else self.rest)(z, t, *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("rest"), name)


def load_model(name: str) -> Bundle:
    """A model name, or FIRST+REST: REST's bundle whose UNet is FIRST's at the first step (``FirstStepUNet``)."""
    if "+" not in name:
        return Bundle.load(registry.resolve(name))
    first, rest = (Bundle.load(registry.resolve(n)) for n in name.split("+"))
    rest.unet = FirstStepUNet(first.unet, rest.unet)
    return rest


def row_images(row: dict, bundles: dict, prompts: list[str], guidance: float, cache: Path | None) -> np.ndarray:
    """``sample`` for one row, loading its model (and the teacher, for hand-off and take-over rows) into
    ``bundles`` once."""
    for name in (row["model"], "teacher") if row["kind"] in ("handoff", "takeover") else (row["model"],):
        if name not in bundles:
            bundles[name] = load_model(name)
    return sample(bundles[row["model"]], row, prompts, guidance, cache, bundles.get("teacher"))


def paired_delta(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> dict:
    """Mean of b - a in points over the images where both are scored, with a percentile bootstrap interval."""
    keep = ~(np.isnan(a) | np.isnan(b))
    d = 100 * (b[keep] - a[keep])
    draws = rng.integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
    return {"delta": float(d.mean()), "ci": [float(low), float(high)], "n": int(keep.sum())}


def label(row: dict) -> str:
    extra = f", gamma {row['gamma']:g}" if row["gamma"] is not None else ""
    if row["timesteps"]:
        return f"{row['model']} lcm on {'-'.join(map(str, row['timesteps']))}"
    if row["kind"] == "handoff":
        return f"teacher ode to t = {row['steps']}, then {row['model']} lcm"
    if row["kind"] == "takeover":
        return f"{row['model']} lcm to t = {row['steps']}, then teacher ode"
    return f"{row['model']} {row['kind']} {row['steps']}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", metavar="ROW")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--judge", default="judge")
    ap.add_argument("--out", default=None, help="JSON file the results are written to")
    ap.add_argument("--grid", type=Path, default=None,
                    help="PNG file: the first 8 images of every row, one row of the grid per ROW, in order")
    ap.add_argument("--cache", type=Path, default=None,
                    help="sample cache of `lcm ablate guidance` (OUT/samples): ode rows are read from it if made there")
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.rows]
    torch.manual_seed(0)
    prompts = [p for p, _ in references.heldout_prompts(args.num_samples)]
    extractor = JudgeExtractor.load(registry.resolve(args.judge))
    reference = references.reference_set(extractor, "prompt-scenes")
    bundles, results, first, shown = {}, [], None, []
    rng = np.random.default_rng(0)
    for row in rows:
        images = row_images(row, bundles, prompts, args.guidance, args.cache)
        shown.append(images[:GRID_COLS])
        scores = scoring.score(images, prompts, extractor, reference, per_image=True)
        per = scores.pop("per_image")["attribute_accuracy"]
        first = first or per
        record = {**row, "label": label(row), "kid": float(scores["kid"]),
                  "accuracy": {k: 100 * float(scores["attribute_accuracy"][k]) for k in ATTRIBUTES},
                  "object_area": float(scoring.object_area(images).mean()),
                  "vs_first": {k: paired_delta(first[k], per[k], args.resamples, rng) for k in ATTRIBUTES}}
        results.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
    summary = {"num_samples": args.num_samples, "guidance": args.guidance, "reference": reference.name,
               "rows": results}
    if args.grid:
        save_grid(from_pixels(np.concatenate(shown)), args.grid, cols=GRID_COLS)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"| row (g = {args.guidance:g}, n = {args.num_samples}) | KID×10³ | background % | shape % "
          f"| object area % | Δ background vs {results[0]['label']} [95%] | Δ shape [95%] |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        b, s = r["vs_first"]["background"], r["vs_first"]["shape"]
        print(f"| {r['label']} | {r['kid']:.1f} | {r['accuracy']['background']:.1f} | {r['accuracy']['shape']:.1f} "
              f"| {100 * r['object_area']:.1f} | {b['delta']:+.1f} [{b['ci'][0]:+.1f}, {b['ci'][1]:+.1f}] "
              f"| {s['delta']:+.1f} [{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}] |")


if __name__ == "__main__":
    main()
