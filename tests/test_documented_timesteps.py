"""The timesteps the README, docs/results.md, Table 1's README and the shipped LCM's card state are the ones
``schedules`` gives for the shipped LCM's own skipping grid (N = original_inference_steps of its scheduler config), so the docs cannot drift."""
import json
import re
from pathlib import Path

import pytest

from latentcm import schedules

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "src" / "latentcm" / "weights" / "lcm"
SCHEDULES = {"grid": schedules.lcm_timesteps, "refine": schedules.refine_timesteps}
NUMBERS = r"(\d+(?:, \d+)+)"  # "999, 499, 299, 99"

# (file, text just before the stated timesteps, schedule, steps); whitespace in the files is collapsed first
STATEMENTS = [
    ("README.md", "The LCM samples on its **refine** timesteps (4 steps: t = ", "refine", 4),
    ("README.md", "on diffusers' own selection (`--schedule grid`: ", "grid", 4),
    ("docs/results.md", "spread over the low-noise half of the grid (4 steps: ", "refine", 4),
    ("docs/results.md", "diffusers' selection on its 20-point grid (4 steps: ", "grid", 4),
    ("src/latentcm/weights/lcm/README.md", 'timesteps=[', "refine", 4),
    ("src/latentcm/weights/lcm/README.md", "gives them for n steps; 8 steps: ", "refine", 8),
    ("src/latentcm/weights/lcm/README.md", "pick its grid timesteps t = ", "grid", 4),
    ("src/latentcm/weights/lcm/README.md", "lcm_timesteps(n, 1000, 20)`; 8 steps: ", "grid", 8),
    ("reports/table1/README.md", "timesteps (its default: 4 steps t = ", "refine", 4),
    ("reports/table1/README.md", "(its default: 4 steps t = 999, 499, 274, 49; 8 steps ", "refine", 8),
    ("reports/table1/README.md", "**grid** selection (4 steps t = ", "grid", 4),
    ("reports/table1/README.md", "**grid** selection (4 steps t = 999, 749, 499, 249; 8 steps ", "grid", 8),
]


def _shipped_grid() -> tuple[int, int]:
    """(T, N) of the shipped LCM's LCMScheduler."""
    cfg = json.loads((CARD / "scheduler" / "scheduler_config.json").read_text())
    return schedules.train_timesteps(cfg), cfg["original_inference_steps"]


def _stated(path: str, anchor: str) -> list[int]:
    text = " ".join((ROOT / path).read_text().split())
    m = re.search(re.escape(anchor) + NUMBERS, text)
    assert m, f"{path} no longer states timesteps after {anchor!r}: update this test with the docs"
    return [int(v) for v in m.group(1).split(", ")]


@pytest.mark.parametrize("path, anchor, schedule, steps", STATEMENTS)
def test_documented_timesteps_are_the_shipped_lcms(path, anchor, schedule, steps):
    T, N = _shipped_grid()
    assert _stated(path, anchor) == SCHEDULES[schedule](steps, T, N).tolist()


def test_card_names_the_shipped_grid_in_its_calls():
    """The card's `schedules.*_timesteps(n, T, N)` calls use the shipped scheduler's T and N."""
    T, N = _shipped_grid()
    text = (CARD / "README.md").read_text()
    calls = re.findall(r"(?:lcm|refine)_timesteps\(n, (\d+), (\d+)\)", text)
    assert calls and all((int(t), int(n)) == (T, N) for t, n in calls)
