"""scripts/paired_fidelity.py: the paired fidelity difference of two samplings against the ODE's images, planted."""
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import paired_fidelity as probe  # noqa: E402

SCRIPT = Path(__file__).parents[1] / "scripts" / "paired_fidelity.py"


def _save(folder: Path, name: str, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}-g2-n48-s0.npz", images=images)


def test_the_sampling_equal_to_the_ode_is_nearer_and_a_copy_is_level(tmp_path, micro_judge):
    from latentcm.evaluation import intervals
    from latentcm.evaluation.extractors import JudgeExtractor

    rng = np.random.default_rng(0)
    ode = rng.integers(0, 256, size=(48, 64, 64, 3), dtype=np.uint8)
    far = ode // 16 + 230                         # a different distribution: near-white, faint texture
    a, b = tmp_path / "a", tmp_path / "b"
    _save(a, probe.ODE_PREFIX, ode)
    _save(a, "m-lcm-4", far)
    _save(b, "m-lcm-4", ode)
    extractor = JudgeExtractor.load(micro_judge)
    draws = intervals.draw(48, 48, 100, seed=1, reference_follows_prompts=True)
    sources = [("far", a, "m-lcm"), ("same", b, "m-lcm")]
    row = probe.compare_at(2.0, sources, 4, 48, extractor, draws)
    assert row["same"] < 1e-6 < row["far"]      # the ODE's own images: paired KID 0
    assert row["ci"][1] < 0 and row["verdict"] == "same nearer"
    tie = probe.compare_at(2.0, [("x", a, "m-lcm"), ("y", a, "m-lcm")], 4, 48, extractor, draws)
    assert tie["difference"] == 0 and tie["ci"] == [0.0, 0.0] and tie["verdict"] == "level"


def test_bad_sources_exit_with_one_line(tmp_path):
    for argv in (["a", "b"], [f"a={tmp_path}/missing:p", f"b={tmp_path}:p"]):
        done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
        assert done.returncode != 0 and done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), f"a={tmp_path}:p", f"b={tmp_path}:p", "--judge", "judge"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "does not exist" in done.stderr and "Traceback" not in done.stderr
