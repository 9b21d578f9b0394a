"""`lcm ablate solver-skip` (LCM Fig. 3): fidelity to the teacher's ODE, paired intervals between runs, verdicts
from the intervals, --until and shared output folders; on micro models (seconds)."""
import json

import numpy as np
import pytest

from latentcm.cli import main
from latentcm.evaluation import intervals, presets, references
from latentcm.evaluation import solver_skip_report as report


def test_paired_difference_of_a_run_to_itself_is_zero_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    ode, run = rng.normal(size=(16, 6)), rng.normal(size=(16, 6))
    draws = intervals.draw(16, 16, 50, seed=1, reference_follows_prompts=True)
    point, boot = report.kid_rows({"a": run, "b": run.copy(), "c": run + 1.0}, ode, draws, paired=True)
    entry = report._entry(point, boot, "b", "a")
    assert entry["diff"] == 0 and entry["diff_ci"] == [0, 0] and entry["verdict"].startswith("level")
    assert entry["ci"][0] < entry["value"] < entry["ci"][1]  # the row's own interval is not degenerate
    assert report._entry(point, boot, "c", "a")["verdict"] == "higher than baseline"  # shifted: farther from the ODE


def test_verdicts_come_from_the_paired_intervals():
    assert report.verdict([-2.0, -0.5]) == "lower than baseline"
    assert report.verdict([0.1, 3.0]) == "higher than baseline"
    assert report.verdict([-1.0, 2.0]) == "level (interval includes 0)"

    def record(run, it, diff_ci):
        return {"run": run, "iteration": it, "intervals": {"fidelity_kid": {
            "value": 1.0, "ci": [0.5, 1.5], "diff": sum(diff_ci) / 2, "diff_ci": diff_ci,
            "verdict": report.verdict(diff_ci)}}}

    records = [record("ddim-k20", 0, [0, 0]), record("ddim-k1", 0, [-3, -1]), record("ddim-k1", 500, [1, 2]),
               record("ddim-k5", 500, [-1, 1])]
    found = {v["run"]: (v["iteration"], v["verdict"]) for v in report.verdicts(records, "ddim-k20")}
    assert found == {"ddim-k1": (500, "higher than baseline"), "ddim-k5": (500, "level (interval includes 0)")}


@pytest.fixture
def ablate_env(micro_teacher, micro_judge, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    monkeypatch.setattr(presets, "TEACHER_STEPS", 2)  # the ODE reference, cheap

    def run(out, *extra):
        main(["ablate", "solver-skip", "--teacher", str(micro_teacher), "--judge", str(micro_judge),
              "--iterations", "2", "--eval-every", "1", "--num-samples", "8", "--batch-size", "2", "--num-data", "4",
              "--resamples", "20", "--out", str(out), *extra])
        return json.loads((out / "results.json").read_text())
    return run


def _probes(out, name):
    run_dir = out / "runs" / name
    records = report.read_probe_log(run_dir / "probe.jsonl")
    return records, [np.load(report.features_path(run_dir, r["iteration"])) for r in records]


def test_until_advanced_run_equals_an_uninterrupted_one_and_processes_share_out(ablate_env, tmp_path):
    straight = ablate_env(tmp_path / "straight", "--pairs", "ddim:50")
    assert [r["iteration"] for r in straight["records"]] == [0, 1, 2]
    assert all("fidelity" in r and "fidelity_kid" in r["intervals"] for r in straight["records"])
    out = tmp_path / "stepped"
    partial = ablate_env(out, "--pairs", "ddim:50", "--until", "1")
    assert [r["iteration"] for r in partial["records"]] == [0, 1] and partial["until"] == 1
    ablate_env(out, "--pairs", "ddim:50")
    (a, fa), (b, fb) = _probes(tmp_path / "straight", "ddim-k50"), _probes(out, "ddim-k50")
    assert len(fa) == len(fb) == 3 and all(np.array_equal(x, y) for x, y in zip(fa, fb))  # the same images
    for x, y in zip(a, b):  # scores: the ODE reference's features are recomputed per session (float round-off)
        assert x["kid"] == y["kid"] and x["fidelity"]["kid"] == pytest.approx(y["fidelity"]["kid"], abs=1e-3)
    # a second process with other pairs in the same folder: results cover both, diffs against the baseline
    shared = ablate_env(out, "--pairs", "ddim:20", "--until", "1")
    assert shared["runs"] == ["ddim-k20", "ddim-k50"] and shared["baseline"] == "ddim-k20"
    at1 = {r["run"]: r["intervals"]["fidelity_kid"] for r in shared["records"] if r["iteration"] == 1}
    assert at1["ddim-k20"]["diff"] == 0 and at1["ddim-k20"]["diff_ci"] == [0, 0]
    assert at1["ddim-k50"]["verdict"] == report.verdict(at1["ddim-k50"]["diff_ci"])
    assert shared["verdicts"][0]["run"] == "ddim-k50" and shared["verdicts"][0]["iteration"] == 1
    assert shared["fastest"]["iteration"] == 1
    md = (out / "results.md").read_text()
    assert f"- ddim-k50 @1: {at1['ddim-k50']['verdict']}" in md and "## Iteration 1" in md
    assert (out / "solver-skip.png").is_file()


def test_a_missing_probe_of_a_checkpoint_is_made_up_and_other_settings_are_refused(ablate_env, tmp_path, capsys):
    ablate_env(tmp_path / "o", "--pairs", "ddim:50", "--until", "1")
    log = tmp_path / "o" / "runs" / "ddim-k50" / "probe.jsonl"
    (_, before) = _probes(tmp_path / "o", "ddim-k50")
    log.write_text(log.read_text().splitlines()[0] + "\n")  # stopped between the checkpoint at 1 and its probe
    ablate_env(tmp_path / "o", "--pairs", "ddim:50", "--until", "1")
    (records, after) = _probes(tmp_path / "o", "ddim-k50")
    assert [r["iteration"] for r in records] == [0, 1] and np.array_equal(before[1], after[1])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        ablate_env(tmp_path / "o", "--pairs", "ddim:50", "--iterations", "4")
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0 and len(err.splitlines()) == 1 and "iterations 2" in err


@pytest.mark.parametrize("args, says", [
    (["--pairs", "ddim:0"], "--pairs"), (["--pairs", "euler:20"], "--pairs"), (["--pairs", "ddim"], "--pairs"),
    (["--until", "5000"], "--until"), (["--iterations", "1000", "--until", "300"], "--eval-every"),
    (["--pairs", "ddim:20", "--skips", "5"], "not both"), (["--baseline", "ddim:20,ddim:5"], "--baseline")])
def test_cli_refusals_are_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "solver-skip", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and says in err
