"""The paper's ablations on the offline world (LCM Fig. 3 and Fig. 4).

* ``solver_skip`` (module ``solver_skip``): a distillation for each ODE solver x skipping step k, the slow-EMA
  student's 4-step samples probed every ``eval_every`` iterations for fidelity to the teacher's guided ODE and KID
  to real, with paired intervals between runs (Fig. 3: does k > 1 converge faster than k = 1?).
* ``guidance``: the teacher's guided ODE and LCMs sampled at several g and step counts, KID against the judge's
  attribute accuracy, and each LCM's fidelity to the ODE per g (Fig. 4; ``guidance_sweep``).

Each writes results.json, results.md and PNGs into its folder; runs resume.
"""
from __future__ import annotations

from pathlib import Path

from . import guidance_sweep, pipeline
from .extractors import JudgeExtractor
from .solver_skip import fid_probe, read_probe_log, solver_skip  # Fig. 3, in its own module


def guidance(bundles: dict, lcm_names: list[str], extractor: JudgeExtractor, out: Path,
             guidances=guidance_sweep.GUIDANCES, steps=guidance_sweep.STEPS, num_samples: int = pipeline.NUM_SAMPLES,
             batch_size: int = 32, seed: int = 0, reference: str = "prompt-scenes",
             resamples: int = guidance_sweep.RESAMPLES) -> dict:
    """Fig. 4: the teacher's guided ODE (``bundles["teacher"]``) and each LCM of ``lcm_names`` at every g and step
    count, their KID-accuracy trade-off and the LCMs' fidelity to the ODE per g (``guidance_sweep.sweep``)."""
    return guidance_sweep.sweep(bundles, lcm_names, extractor, Path(out), guidances, steps, num_samples, batch_size,
                                seed, reference, resamples=resamples)


__all__ = ["solver_skip", "guidance", "fid_probe", "read_probe_log"]
