"""The paper's ablations on the offline world (LCM Fig. 3 and Fig. 4).

* ``solver_skip``: short distillations for each ODE solver x skipping step k, the 4-step FID of the
  student probed every ``eval_every`` iterations (Fig. 3: does k > 1 converge faster than k = 1?).
* ``guidance``: the teacher's guided ODE and LCMs sampled at several g and step counts, KID against the judge's
  attribute accuracy, and each LCM's fidelity to the ODE per g (Fig. 4; ``guidance_sweep``).

Each writes results.json, a Markdown table and a PNG into its folder; runs resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bundle import Bundle
from ..defaults import LCM_OMEGA, LCM_SAMPLER, LCM_STEPS
from ..files import write_text
from ..guidance import guidance_from_omega
from ..models.denoiser import make_student
from ..sampling.latents import sample_latents
from ..schedules import grid_size, train_timesteps
from ..training import recipes
from ..training.consistency import LCDConfig
from ..training.loop import LoopConfig
from . import guidance_sweep, pipeline, references, reports, scoring
from .results import upgrade_keys, write_results
from .extractors import JudgeExtractor

PROBE_STEPS, PROBE_OMEGA = LCM_STEPS, LCM_OMEGA  # Fig. 3 tracks 4-step FID at the shipped default w


def fid_probe(bundle, extractor: JudgeExtractor, reference: references.Reference, num_samples: int,
              original_inference_steps: int, log_path: Path, batch_size: int = 64, seed: int = 0):
    """A ``preview_fn`` for ``recipes.run`` that appends {iteration, fid, kid, kid_std, precision, recall,
    caption_score, exact_match, histogram_distance} of the student's PROBE_STEPS-step samples (w = PROBE_OMEGA)
    on held-out prompts to ``log_path`` (JSON lines). The samples come from the in-training UNet
    (``sample_latents``), not a cached row; they are scored by ``scoring.score`` like every other row."""
    prompts = [p for p, _ in references.heldout_prompts(num_samples)]
    states = bundle.encode_prompts(prompts)  # [N, L, D]
    size = bundle.default_size

    @torch.no_grad()
    def probe(student_unet, step: int, out_dir: Path) -> None:
        p = next(student_unet.parameters())
        images = []
        for i in range(0, num_samples, batch_size):
            z = sample_latents(student_unet, bundle.scheduler_config, LCM_SAMPLER,
                               states[i:i + batch_size].to(p.device, p.dtype),
                               [seed + j for j in range(i, min(i + batch_size, num_samples))],
                               bundle.latent_shape(size, size), steps=PROBE_STEPS, guidance=guidance_from_omega(PROBE_OMEGA),
                               original_inference_steps=original_inference_steps)
            images.append(bundle.decode(z.to(bundle.vae.device, bundle.vae.dtype)).float().cpu())
        scored = scoring.rounded(scoring.score(torch.cat(images), prompts, extractor, reference))
        record = {"iteration": step, **{k: v for k, v in scored.items() if k != "attribute_accuracy"}}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return probe


def read_probe_log(path: Path) -> list[dict]:
    """Probe records, the last one per iteration (a resumed run may probe an iteration twice); keys of
    older logs renamed (``results.upgrade_keys``)."""
    if not path.is_file():
        return []
    by_iter = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = upgrade_keys(json.loads(line))
            by_iter[r["iteration"]] = r
    return [by_iter[k] for k in sorted(by_iter)]


def solver_skip(teacher_dir: Path, out: Path, pairs: list[tuple[str, int]], iterations: int,
                eval_every: int, extractor: JudgeExtractor, num_samples: int = 1000, batch_size: int = 16,
                num_data: int = 4000, lr: float = 1e-4, seed: int = 0, loss: str = "huber",
                reference: str = "prompt-scenes") -> dict:
    """Fig. 3: distil every (solver, k) pair for ``iterations`` steps, probing the student's 4-step
    KID and FID every ``eval_every``."""
    out = Path(out)
    bundle = Bundle.load(teacher_dir)
    ref = references.reference_set(extractor, reference)
    records = []
    for solver, k in pairs:
        run_dir = out / "runs" / f"{solver}-k{k}"
        log = run_dir / "probe.jsonl"
        n_grid = grid_size(train_timesteps(bundle.scheduler_config), k)
        cfg = LCDConfig(solver=solver, skip=k, loss=loss, batch_size=batch_size, seed=seed)
        probe = fid_probe(bundle, extractor, ref, num_samples, n_grid, log)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not any(r["iteration"] == 0 for r in read_probe_log(log)):  # the untrained student: where runs start
            probe(make_student(bundle.unet, cfg.time_cond_proj_dim, cond_proj_init=cfg.cond_proj_init), 0, run_dir)
        if read_probe_log(log)[-1]["iteration"] < iterations:
            loop_cfg = LoopConfig(max_steps=iterations, lr=lr, warmup=0, schedule="constant",
                                  checkpoint_every=eval_every, preview_every=eval_every, keep_checkpoints=1)
            recipes.run("distill", recipes.Job(
                Path(teacher_dir), run_dir, loop_cfg, lcd=cfg, num_data=num_data,
                resume=(run_dir / "checkpoints").exists(), preview_fn=probe, export=False,
                data_cache=out / "data-cache.safetensors"))
        records += [{"solver": solver, "skip": k, **r} for r in read_probe_log(log)]
    results = {"iterations": iterations, "eval_every": eval_every, "num_samples": num_samples,
               "probe": {"steps": PROBE_STEPS, "omega": PROBE_OMEGA}, "batch_size": batch_size,
               "reference": ref.name, "reference_kind": ref.kind, "records": records,
               "floor": scoring.floor(extractor, ref, num_samples)}
    _write(out, results, solver_skip_markdown(records, results["floor"]),
           plot_solver_skip(records, out / "solver-skip.png", results["floor"]))
    return results


def solver_skip_markdown(records: list[dict], floor: dict | None = None) -> str:
    """KID x10^3 +- std and FID at every probed iteration, a row per (solver, k), and the perfect
    generator's row at the probes' n (FID is biased upward at finite n; KID is not)."""
    iters = sorted({r["iteration"] for r in records})
    head = [f"KID×10³ @{i}" for i in iters] + [f"FID @{i}" for i in iters]
    lines = ["| solver | k | " + " | ".join(head) + " |", "|" + "---|" * (2 + len(head))]
    for solver in dict.fromkeys(r["solver"] for r in records):
        for k in sorted({r["skip"] for r in records if r["solver"] == solver}):
            by = {r["iteration"]: r for r in records if r["solver"] == solver and r["skip"] == k}
            kids = [f"{by[i]['kid']:.1f} ± {by[i]['kid_std']:.1f}" if i in by else "-" for i in iters]
            fids = [f"{by[i]['fid']:.1f}" if i in by else "-" for i in iters]
            lines.append(f"| {solver} | {k} | " + " | ".join(kids + fids) + " |")
    if floor:
        cells = [f"{floor['kid']:.1f} ± {floor['kid_std']:.1f}"] * len(iters) + [f"{floor['fid']:.1f}"] * len(iters)
        lines.append(f"| real images (floor, n = {floor['num_samples']}) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_solver_skip(records: list[dict], path: Path, floor: dict | None = None) -> Path:
    """One panel per solver: 4-step KID (± its std over subsets) against iteration, a line per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = list(dict.fromkeys(r["solver"] for r in records))
    fig, axes = plt.subplots(1, len(solvers), figsize=(4 * len(solvers), 3.4), sharey=True, squeeze=False)
    for ax, solver in zip(axes[0], solvers):
        for k in sorted({r["skip"] for r in records if r["solver"] == solver}):
            rs = [r for r in records if r["solver"] == solver and r["skip"] == k]
            ax.errorbar([r["iteration"] for r in rs], [r["kid"] for r in rs], yerr=[r["kid_std"] for r in rs],
                        marker="o", capsize=3, label=f"k = {k}")
        if floor:
            ax.axhline(floor["kid"], color="grey", ls="--", lw=1, label="real images")
        ax.set_title(f"{reports.SAMPLER_LABELS.get(solver, solver)}: 4-step KID", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("KID ×10³ (judge features)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def guidance(bundles: dict, lcm_names: list[str], extractor: JudgeExtractor, out: Path,
             guidances=guidance_sweep.GUIDANCES, steps=guidance_sweep.STEPS, num_samples: int = pipeline.NUM_SAMPLES,
             batch_size: int = 32, seed: int = 0, reference: str = "prompt-scenes",
             resamples: int = guidance_sweep.RESAMPLES) -> dict:
    """Fig. 4: the teacher's guided ODE (``bundles["teacher"]``) and each LCM of ``lcm_names`` at every g and step
    count, their KID-accuracy trade-off and the LCMs' fidelity to the ODE per g (``guidance_sweep.sweep``)."""
    return guidance_sweep.sweep(bundles, lcm_names, extractor, Path(out), guidances, steps, num_samples, batch_size,
                                seed, reference, resamples=resamples)


def _write(out: Path, results: dict, table: str, plot: Path) -> None:
    write_results(out / "results.json", results)
    write_text(out / "results.md", table)


__all__ = ["solver_skip", "guidance", "fid_probe", "read_probe_log"]
