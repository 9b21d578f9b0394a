"""LCM Fig. 3 on the offline world: for each ODE solver x skipping step k a distillation (LCD, LCM Algorithm 1),
probed every ``eval_every`` iterations. Does k > 1 converge faster than k = 1, and do the solvers differ?

A probe samples PROBE_STEPS-step images of the weights the run would export (the slow EMA of the student) at
w = PROBE_OMEGA for ``num_samples`` held-out prompts, image i from seed ``seed + i``, and scores them twice:

* fidelity: against the teacher's own guided ODE at the same w (``presets.ode_row``: what LCD distils towards,
  LCM Eq. 6), sampled once from the same prompts and seeds into OUT/samples; KID is the paired estimator
  (``scoring.score(paired=True)``), FD beside it. This measures distillation alone;
* KID to real images, which also moves with how much the guided target inflates objects.

Each probe appends a line to OUT/runs/SOLVER-kK/probe.jsonl and keeps the judge features of its images
(``features/step-NNNNNNN.npy``, float32 [N, D]), so ``solver_skip_report`` can bootstrap every run's interval
and the paired difference of any two runs (every probe of every run shares prompts and seeds).

Runs resume; ``until`` trains every requested run up to that iteration only (the cosine lr is still defined by
``iterations``), so partial curves of several sessions compare. Processes with different pairs may share OUT:
each run's settings are kept beside it and results cover every run of OUT with the same settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..bundle import Bundle
from ..defaults import LCM_OMEGA, LCM_SAMPLER, LCM_STEPS
from ..files import atomic_path, write_json
from ..guidance import guidance_from_omega
from ..models.denoiser import make_student
from ..sampling.latents import sample_latents
from ..schedules import grid_size, train_timesteps
from ..training import recipes
from ..training.checkpoint import CKPT_RE, list_checkpoints, read_checkpoint
from ..training.consistency import LCDConfig
from ..training.loop import LoopConfig
from . import references, scoring, solver_skip_report
from .extractors import JudgeExtractor
from .generation import generate_cached
from .presets import ode_row
from .solver_skip_report import features_path, read_probe_log, run_name

PROBE_STEPS, PROBE_OMEGA = LCM_STEPS, LCM_OMEGA  # Fig. 3 tracks 4-step samples at the shipped default w
PAIRS = (("ddim", 1), ("ddim", 5), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm-solver", 20),
         ("dpm-solver++", 20))
ITERATIONS, EVAL_EVERY = 3000, 500
# 500 prompts: the ODE reference is 50 000 teacher passes (~7 min on one CPU thread), a probe 2000 student passes
NUM_SAMPLES = 500
BATCH_SIZE, LR, STUDENT_EMA, MIN_LR_RATIO = 16, 1e-4, 0.999, 0.1


def _student_images(bundle, unet, states, num_samples: int, batch_size: int, seed: int,
                    original_inference_steps: int) -> torch.Tensor:
    """PROBE_STEPS-step images [N, 3, H, W] of ``unet`` at w = PROBE_OMEGA, image i from seed ``seed + i``."""
    p, size, images = next(unet.parameters()), bundle.default_size, []
    for i in range(0, num_samples, batch_size):
        z = sample_latents(unet, bundle.scheduler_config, LCM_SAMPLER, states[i:i + batch_size].to(p.device, p.dtype),
                           [seed + j for j in range(i, min(i + batch_size, num_samples))],
                           bundle.latent_shape(size, size), steps=PROBE_STEPS,
                           guidance=guidance_from_omega(PROBE_OMEGA),
                           original_inference_steps=original_inference_steps)
        images.append(bundle.decode(z.to(bundle.vae.device, bundle.vae.dtype)).float().cpu())
    return torch.cat(images)


def fid_probe(bundle, extractor: JudgeExtractor, reference: references.Reference, num_samples: int,
              original_inference_steps: int, log_path: Path, batch_size: int = 64, seed: int = 0,
              ode_reference: references.Reference | None = None):
    """A ``preview_fn`` for ``recipes.run``: scores the student's samples on held-out prompts against ``reference``
    (real images) and, with ``ode_reference``, against the teacher's ODE images of the same prompts and seeds
    ("fidelity": paired KID, its std, FD); keeps the images' judge features (``features_path``), then appends
    {iteration, fid, kid, kid_std, ..., fidelity} to ``log_path`` (JSON lines)."""
    prompts = [p for p, _ in references.heldout_prompts(num_samples)]
    states = bundle.encode_prompts(prompts)  # [N, L, D]

    @torch.no_grad()
    def probe(student_unet, step: int, out_dir: Path) -> None:
        images = _student_images(bundle, student_unet, states, num_samples, batch_size, seed, original_inference_steps)
        scored = scoring.score(images, prompts, extractor, reference, per_image=True)
        features = scored.pop("per_image")["features"]
        record = {"iteration": step, **{k: v for k, v in scoring.rounded(scored).items() if k != "attribute_accuracy"}}
        if ode_reference is not None:
            record["fidelity"] = scoring.rounded(scoring.distances(features, ode_reference, paired=True))
        with atomic_path(features_path(log_path.parent, step)) as tmp:  # before the log line that names it
            np.save(tmp, np.asarray(features, np.float32), allow_pickle=False)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return probe


def ode_target(bundle, prompts: list[str], out: Path, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """The teacher's guided ODE images at the probe's w for ``prompts`` (image i from seed ``seed + i``), sampled once
    into OUT/samples (``generate_cached``) and reused by every run and every later session."""
    row = ode_row(guidance_from_omega(PROBE_OMEGA))
    return generate_cached(bundle, row, prompts, seed, Path(out) / "samples", batch_size)[0]


def check_until(until: int | None, iterations: int, eval_every: int) -> None:
    """``until`` must lie on the probe grid (a multiple of ``eval_every``, or ``iterations``) within the run."""
    if until is None:
        return
    if not 1 <= until <= iterations:
        raise ValueError(f"--until {until} must be within 1..--iterations ({iterations})")
    if until % eval_every and until != iterations:
        raise ValueError(f"--until {until} must be a multiple of --eval-every ({eval_every}) or --iterations, so "
                         "that every run's last probe falls on the same iteration")


def _settings_check(run_dir: Path, settings: dict) -> None:
    """Write the run's settings beside it, or refuse a run started with other ones (its probes would not compare)."""
    path = run_dir / "settings.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        found = json.loads(path.read_text())
        changed = sorted(k for k in settings if found.get(k) != settings[k])
        if changed:
            was = ", ".join(f"{k} {found.get(k)}" for k in changed)
            raise ValueError(f"{run_dir} was started with other settings ({was}); rerun with those or use another --out")
    elif (run_dir / "probe.jsonl").is_file() or (run_dir / "checkpoints").is_dir():
        raise ValueError(f"{run_dir} holds a run without settings.json (an older ablation); use another --out")
    else:
        write_json(path, settings)


def _probe_checkpoint(run_dir: Path, probe, bundle, cfg: LCDConfig, eval_every: int, iterations: int) -> None:
    """Probe the latest checkpoint when it lies on the probe grid but its probe is missing (a session stopped
    between the checkpoint and its probe): the student's slow EMA (the online student without one) from the file."""
    found = list_checkpoints(run_dir / "checkpoints")
    step = int(CKPT_RE.search(found[-1].name).group(1)) if found else 0
    done = {r["iteration"] for r in read_probe_log(run_dir / "probe.jsonl")}
    if step == 0 or step in done or (step % eval_every and step != iterations):
        return
    tensors, _ = read_checkpoint(found[-1])
    prefix = "module.student_ema." if cfg.student_ema > 0 else "module.student."
    student = make_student(bundle.unet, cfg.time_cond_proj_dim, cond_proj_init=cfg.cond_proj_init)
    student.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    probe(student.eval(), step, run_dir)


def _advance(bundle, teacher_dir: Path, out: Path, pair: tuple[str, int], settings: dict, target: int,
             extractor, ref, ode_ref) -> None:
    """Train one (solver, k) run up to ``target`` iterations (resuming), probing every eval_every."""
    (solver, k), s = pair, settings
    run_dir = out / "runs" / run_name(solver, k)
    log = run_dir / "probe.jsonl"
    n_grid = grid_size(train_timesteps(bundle.scheduler_config), k)
    cfg = LCDConfig(solver=solver, skip=k, loss=s["loss"], batch_size=s["batch_size"], seed=s["seed"],
                    student_ema=s["student_ema"])
    probe = fid_probe(bundle, extractor, ref, s["num_samples"], n_grid, log, seed=s["seed"], ode_reference=ode_ref)
    if not any(r["iteration"] == 0 for r in read_probe_log(log)):  # the untrained student: where runs start
        probe(make_student(bundle.unet, cfg.time_cond_proj_dim, cond_proj_init=cfg.cond_proj_init), 0, run_dir)
    _probe_checkpoint(run_dir, probe, bundle, cfg, s["eval_every"], s["iterations"])
    if read_probe_log(log)[-1]["iteration"] >= target:
        return
    loop_cfg = LoopConfig(max_steps=s["iterations"], stop_at=target, lr=s["lr"], warmup=0, schedule="cosine",
                          min_lr_ratio=s["min_lr_ratio"], checkpoint_every=s["eval_every"],
                          preview_every=s["eval_every"], keep_checkpoints=1)
    recipes.run("distill", recipes.Job(
        Path(teacher_dir), run_dir, loop_cfg, lcd=cfg, num_data=s["num_data"],
        resume=(run_dir / "checkpoints").exists(), preview_fn=probe, export=False,
        data_cache=out / "data-cache.safetensors"))


def solver_skip(teacher_dir: Path, out: Path, pairs: list[tuple[str, int]], iterations: int, eval_every: int,
                extractor: JudgeExtractor, num_samples: int = NUM_SAMPLES, batch_size: int = BATCH_SIZE,
                num_data: int = 4000, lr: float = LR, seed: int = 0, loss: str = "huber",
                reference: str = "prompt-scenes",
                until: int | None = None, student_ema: float = STUDENT_EMA, min_lr_ratio: float = MIN_LR_RATIO,
                baseline: tuple[str, int] = ("ddim", 20), resamples: int = solver_skip_report.RESAMPLES) -> dict:
    """Fig. 3: distil every (solver, k) pair to ``until`` (default: ``iterations``), probing every ``eval_every``
    (``fid_probe``); then write results.json, results.md and solver-skip.png from every run of OUT with these
    settings (``solver_skip_report``), paired differences to the ``baseline`` run. Returns the results dict."""
    check_until(until, iterations, eval_every)
    out = Path(out)
    bundle = Bundle.load(teacher_dir)
    ref = references.reference_set(extractor, reference)
    settings = {"iterations": iterations, "eval_every": eval_every, "num_samples": num_samples,
                "batch_size": batch_size, "num_data": num_data, "lr": lr, "seed": seed, "loss": loss,
                "reference": ref.name, "student_ema": student_ema, "min_lr_ratio": min_lr_ratio}
    for pair in pairs:  # every run's settings checked before any work
        _settings_check(out / "runs" / run_name(*pair), settings)
    prompts = [p for p, _ in references.heldout_prompts(num_samples)]
    ode_images = ode_target(bundle, prompts, out, seed)
    ode_ref = scoring.reference_from_images(ode_images, extractor, "teacher-ode")
    for pair in pairs:
        _advance(bundle, teacher_dir, out, pair, settings, until or iterations, extractor, ref, ode_ref)
    ode_scores = scoring.rounded(scoring.score(ode_images, prompts, extractor, ref))
    results = solver_skip_report.build(out, [run_name(*p) for p in pairs], settings, ref, ode_ref,
                                       baseline=run_name(*baseline), resamples=resamples)
    results.update(probe={"steps": PROBE_STEPS, "omega": PROBE_OMEGA,
                          "teacher_ode": {"sampler": ode_row(0).sampler, "steps": ode_row(0).steps}},
                   until=until or iterations, reference_kind=ref.kind,
                   teacher_ode={k: ode_scores[k] for k in ("kid", "kid_std", "fid")},
                   floor=scoring.floor(extractor, ref, num_samples))
    solver_skip_report.write(out, results)
    return results


__all__ = ["solver_skip", "fid_probe", "read_probe_log", "ode_target", "check_until", "features_path", "run_name",
           "PAIRS", "ITERATIONS", "EVAL_EVERY", "NUM_SAMPLES", "PROBE_STEPS", "PROBE_OMEGA"]
