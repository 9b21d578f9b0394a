"""Property-based fuzz of the input surfaces, bounded (the long run: scripts/fuzz_inputs.py, counts in
reports/reliability/fuzz.json). CLI cases are parse level only: every command's callback is a no-op."""
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

_spec = importlib.util.spec_from_file_location("fuzz_inputs", Path(__file__).parents[1] / "scripts" / "fuzz_inputs.py")
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)
sys.addaudithook(fz._audit)  # records opens only while a folder case runs

EXAMPLES = {"cli": 400, "folder": 80, "model": 12, "lora": 12}


@pytest.fixture(scope="module")
def ctx(micro_teacher, tmp_path_factory):
    return {"tmp": tmp_path_factory.mktemp("fuzz"), "teacher": micro_teacher}


@pytest.mark.parametrize("surface", list(EXAMPLES))
def test_fuzz_surface_never_ends_in_a_traceback(surface, ctx):
    result = fz.run_surface(surface, EXAMPLES[surface], ctx, rng_seed=1)
    assert result["tracebacks"] == 0, result["first_failure"]
    assert result["cases"] >= EXAMPLES[surface] // 2


@pytest.mark.parametrize("argv", [[], ["ablate"], ["world"], ["generate"], ["--no-such"], ["generate", "x", "--steps"],
                                  ["generate", "x", "--guidance", "nan"], ["distill", "--out"]])
def test_known_parse_cases_are_one_line_or_help(argv):
    with fz.parse_only():
        code, out, err = fz.run_cli(argv)
    fz.check_one_line(code, err, str(argv))
    if not argv or argv in (["ablate"], ["world"]):
        assert code == 0 and "Usage:" in out
