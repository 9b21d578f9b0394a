"""One evaluation path: every command that scores images goes through ``scoring.score``; the presets of
``lcm evaluate`` write results.json with KID (and the other new metrics) and the real-image floor; the
independent reference set holds scenes disjoint from the prompts'."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest

from latentcm import world
from latentcm.cli import main
from latentcm.evaluation import compare, lcf_eval, pipeline, presets, references, scoring, style
from latentcm.evaluation import results as results_file
from latentcm.evaluation.extractors import JudgeExtractor

ROOT = Path(__file__).resolve().parents[1]
N = 4  # prompts per row
KID_FIELDS = ("fid", "kid", "kid_std", "precision", "recall", "histogram_distance")


@pytest.fixture(scope="module")
def scored(micro_lcm, micro_teacher, micro_judge, tmp_path_factory):
    """Run every scoring command once on micro models with ``scoring.score`` wrapped: {command: (out, calls)},
    calls being the images count of each ``scoring.score`` call the command made."""
    tmp = tmp_path_factory.mktemp("eval-pipeline")
    calls: list[int] = []
    real_score = scoring.score

    def counting(images, prompts, *args, **kwargs):
        calls.append(len(images))
        return real_score(images, prompts, *args, **kwargs)

    common = ["--judge", str(micro_judge), "--num-samples", str(N), "--batch-size", "4"]
    commands = {
        "table1": ["evaluate", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--steps", "1,2",
                   "--samplers", "lcm,ddim", *common],
        "lcm": ["evaluate", "--preset", "lcm", "--model", str(micro_lcm), "--teacher", str(micro_teacher), *common],
        "teacher": ["evaluate", "--preset", "teacher", "--model", str(micro_teacher), "--steps", "2", *common],
        "independent": ["evaluate", "--model", str(micro_lcm), "--samplers", "lcm", "--steps", "1",
                        "--reference", "independent", *common],
        "guidance": ["ablate", "guidance", "--model", str(micro_lcm), "--teacher", str(micro_teacher), "--omegas", "2,8",
                     "--steps", "1", "--resamples", "0", *common],
        "solver-skip": ["ablate", "solver-skip", "--teacher", str(micro_teacher), "--judge", str(micro_judge),
                        "--solvers", "ddim", "--skips", "50", "--iterations", "1", "--eval-every", "1",
                        "--num-samples", str(N), "--batch-size", "2", "--num-data", "2"],
    }
    found = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTCM_CACHE", str(tmp / "cache"))
        mp.setattr(references, "REFERENCE_COUNT", 40)
        mp.setattr(scoring, "score", counting)
        mp.setattr(presets, "VAE_PSNR_COUNT", 8)
        mp.setattr(presets, "JUDGE_REAL_COUNT", 16)
        mp.setattr(presets, "TEACHER_STEPS", 2)  # the guidance sweep's teacher ODE
        for name, args in commands.items():
            out = tmp / name
            calls.clear()
            main([*args, "--out", str(out)])
            found[name] = (out, list(calls))
        # the LCF / LoRA reports' path (lcf_eval), on a micro LCM and an untrained style judge
        from latentcm.bundle import Bundle

        calls.clear()
        bundle = Bundle.load(micro_lcm)
        extractor = JudgeExtractor.load(micro_judge)
        judge = style.StyleJudge(width=4).eval()
        results = lcf_eval.evaluate_models({"m": bundle}, extractor, judge, tmp / "lcf", steps=(1,), num_samples=N,
                                           reference_count=8, cache_dir=tmp / "cache")
        ceiling = lcf_eval.ceilings(extractor, judge, bundle.vae, num_samples=N, reference_count=8,
                                    cache_dir=tmp / "cache")
        found["lcf"] = ((results, ceiling), list(calls))
    return found


def _results(scored, name) -> dict:
    return json.loads((scored[name][0] / "results.json").read_text())


def test_every_scoring_command_calls_the_one_score_function(scored):
    # table1: 4 rows + the floor; lcm preset: its rows + the floor; teacher: held-out, paraphrase,
    # the judge on real images, the floor; guidance: per g the teacher ODE and the LCM, + floor; solver-skip: two
    # probes (the untrained student and one iteration) against real images, the ODE itself + the floor; lcf: one
    # per (model, steps) and the two ceilings. Fidelity to the ODE (guidance, solver-skip) is scored from the
    # features ``score`` already extracted, through ``scoring.distances`` (no second judge pass)
    expected = {"table1": [N] * 5, "lcm": [N] * (len(presets.LCM_TABLE_ROWS) + 1),
                "teacher": [N, N, 16, N], "independent": [N, N], "guidance": [N] * 5,
                "solver-skip": [N] * 4, "lcf": [N] * 3}
    assert {name: calls for name, (_, calls) in scored.items()} == expected


def test_no_module_scores_images_outside_scoring_score():
    """The metric calls (FID, KID, judge predictions, ...) live in scoring.score only."""
    scoring = {"frechet_distance", "kid", "attribute_agreement", "exact_accuracy", "precision_recall",
               "histogram_distance", "probabilities", "predict", "predict_from", "attribute_accuracy"}
    files = [*sorted((ROOT / "src" / "latentcm" / "evaluation").glob("*.py")),
             *sorted((ROOT / "src" / "latentcm" / "cli").glob("*.py")),
             *sorted((ROOT / "scripts").glob("*_report.py")), ROOT / "scripts" / "diagnose_templates.py",
             ROOT / "scripts" / "ship_teacher.py", ROOT / "scripts" / "ship_lcm.py"]
    offenders = {}
    for path in files:
        if path.name in ("metrics.py", "intervals.py", "extractors.py"):
            continue  # the metric functions, their sampling intervals and the feature extractors themselves
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if path.name == "scoring.py" and fn.name in ("score", "distances", "attribute_accuracy", "judged_values"):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", getattr(node.func, "id", None))
                    if name in scoring:
                        offenders.setdefault(path.name, set()).add(f"{fn.name} -> {name}")
    assert not offenders, offenders
    assert not (ROOT / "src" / "latentcm" / "evaluation" / "judge_eval.py").exists()


def test_one_row_type():
    assert compare.Row is pipeline.Row and all(isinstance(r, pipeline.Row) for r in presets.LCM_TABLE_ROWS)
    row = pipeline.Row("lcm", "lcm", 2, 8.5)
    assert row.key == "lcm-lcm-2-g8.5" and row.label == "LCM 2 steps"
    assert tuple(row) == ("lcm", "lcm", 2, 8.5, None, None, None, None)
    bench = (ROOT / "benchmarks" / "bench_sampling.py").read_text()
    assert "from latentcm.evaluation.pipeline import Row" in bench


def _has_kid(record: dict) -> None:
    for key in KID_FIELDS:
        assert key in record, key
    assert record["kid_std"] >= 0 and set(record["histogram_distance"]) == {"size", "position"}
    assert all(0 <= v <= 1 for v in record["histogram_distance"].values())


def test_table1_results_carry_kid_and_the_floor(scored):
    results = _results(scored, "table1")
    results_file.validate_results(results)
    assert results["reference_kind"] == "prompt-scenes" and results["image_format"] == "uint8"
    for r in [*results["records"], results["floor"]]:
        _has_kid(r)
    assert results["floor"]["num_samples"] == N
    table = (scored["table1"][0] / "table1.md").read_text().splitlines()
    assert "KID×10³ 1" in table[0] and "Δ KID×10³ 1 vs LCM" in table[0]
    floor = next(i for i, line in enumerate(table) if line.startswith(f"| *real images (floor, n = {N})*"))
    assert "(subset sd " in table[floor] and " [" in table[floor - 1]  # the floor: its subset spread, named so
    # every row carries its sampling intervals, the DDIM rows their paired difference to the LCM row
    lcm, ddim = ({r["steps"]: r for r in results["records"] if r["sampler"] == s} for s in ("lcm", "ddim"))
    for n in (1, 2):
        assert ddim[n]["paired"]["baseline"] == lcm[n]["key"] == lcm[n]["paired"]["baseline"]
        assert ddim[n]["intervals"]["kid"]["ci"][0] <= ddim[n]["intervals"]["kid"]["ci"][1]
    assert results["interval_settings"]["num_resamples"] == 1000 and "Sampling intervals (95%" in "\n".join(table)


def _numbers(value) -> list:
    """The numbers of a nested dict / list, in order; strings kept as they are."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in [k, *_numbers(value[k])]]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value]


def test_table1_intervals_are_recomputed_from_the_cached_images(scored, micro_judge, tmp_path, monkeypatch):
    """scripts/table1_report.py --intervals: the same intervals from OUT/samples, no model loaded."""
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import table1_report

    folder = tmp_path / "table1"
    shutil.copytree(scored["table1"][0], folder)
    monkeypatch.setenv("LATENTCM_CACHE", str(scored["table1"][0].parent / "cache"))
    monkeypatch.setattr(references, "REFERENCE_COUNT", 40)
    before = json.loads((folder / "results.json").read_text())
    assert table1_report.main([str(folder), "--intervals", "--judge", str(micro_judge)]) == 0
    after = json.loads((folder / "results.json").read_text())
    for part in ("intervals", "paired"):  # the judge's features again: equal up to float summation order
        got, want = (_numbers([r[part] for r in res["records"]]) for res in (after, before))
        assert [x for x in got if isinstance(x, str)] == [x for x in want if isinstance(x, str)]
        assert [x for x in got if not isinstance(x, str)] == pytest.approx(
            [x for x in want if not isinstance(x, str)], rel=1e-3, abs=1e-2)
    shutil.rmtree(folder / "samples")
    assert table1_report.main([str(folder), "--intervals", "--judge", str(micro_judge)]) == 2


def test_lcm_preset_writes_the_judge_table_with_kid(scored, micro_lcm):
    results = _results(scored, "lcm")
    results_file.validate_results(results, presets.LCM_RESULTS_SCHEMA)
    assert results["lcm"] == str(micro_lcm) and results["num_samples"] == N
    assert [tuple(r[k] for k in ("model", "sampler", "steps", "guidance")) for r in results["rows"]] == \
        [tuple(r)[:4] for r in presets.LCM_TABLE_ROWS]
    for r in [*results["rows"], results["floor"]]:
        _has_kid(r)
    assert results["image_format"] == "float32"
    samples = sorted((scored["lcm"][0] / "samples").glob("*.npz"))
    assert len(samples) == len(presets.LCM_TABLE_ROWS) and all(p.name.endswith("-f32.npz") for p in samples)
    with np.load(samples[0]) as f:
        assert f["images"].dtype == np.float32 and f["images"].shape == (N, 3, 64, 64)
    assert (scored["lcm"][0] / "results.md").read_text().splitlines()[-1].startswith("| *real images (floor")


def test_teacher_preset_writes_what_evaluate_teacher_did_plus_kid(scored):
    out = scored["teacher"][0]
    results = _results(scored, "teacher")
    results_file.validate_results(results, presets.TEACHER_RESULTS_SCHEMA)
    assert (results["sampler"], results["steps"], results["guidance"], results["num_samples"]) == ("ddim", 2, 7.5, N)
    assert results["unet_evals_per_image"] == 4 and results["paraphrase"]["split"] == "paraphrase"
    assert set(results["judge_on_real_images"]) == set(scoring.SCORED) and results["vae_psnr_db"] > 0
    for r in (results, results["paraphrase"], results["floor"]):
        _has_kid(r)
    assert (out / "heldout-grid.png").is_file() and len((out / "prompts.txt").read_text().splitlines()) == N


def test_ablations_and_lcf_rows_carry_kid(scored):
    for name in ("guidance", "solver-skip"):
        results = _results(scored, name)
        for r in [*results["records"], results["floor"]]:
            _has_kid(r)
    assert "KID×10³ to real" in (scored["guidance"][0] / "results.md").read_text()
    (results, ceiling), _ = scored["lcf"]
    for r in [*results["m"], *ceiling.values()]:
        _has_kid(r)
        assert 0 <= r["style_accuracy"] <= 1
    assert "KID×10³" in lcf_eval.markdown(results, ceiling=ceiling)


def test_independent_reference_holds_scenes_disjoint_from_the_prompts(scored, micro_judge, tmp_path):
    results = _results(scored, "independent")
    assert results["reference_kind"] == "independent" and f"from{references.INDEPENDENT_START}" in results["reference"]
    assert results["reference"] != _results(scored, "table1")["reference"]
    n, count = 256, 300
    prompts = references.heldout_samples(n)
    start = references.INDEPENDENT_START
    independent = list(world.iter_samples(references.PROMPT_SEED, count, "heldout", start=start))
    overlapping = list(world.iter_samples(references.PROMPT_SEED, count, "heldout"))
    # sample identities (seed, split, index) and the rng seeds they hash to are disjoint ...
    assert start >= 100000  # beyond every --num-samples
    prompt_seeds = {world._stable_hash(references.PROMPT_SEED, "heldout", i) for i in range(n)}
    reference_seeds = {world._stable_hash(references.PROMPT_SEED, "heldout", i) for i in range(start, start + count)}
    assert not prompt_seeds & reference_seeds
    assert not {s.scene for s in prompts} & {s.scene for s in independent}
    # ... while the committed reports' reference holds the prompts' very scenes
    assert [s.scene for s in overlapping[:n]] == [s.scene for s in prompts]
    ref = references.reference_set(JudgeExtractor.load(micro_judge), "independent", count=12, cache_dir=tmp_path)
    assert ref.kind == "independent" and ref.path.name.endswith(f"-from{start}.npz")
    assert list(ref.labels["size"]) == [s.scene.size for s in independent[:12]]
    with pytest.raises(ValueError, match="unknown reference"):
        references.reference_set(JudgeExtractor.load(micro_judge), "train", count=12, cache_dir=tmp_path)


def test_floor_sits_lower_on_a_reference_that_holds_its_own_images(tmp_path):
    """Real images scored against a reference that contains them come out closer than against an
    independent set: why --reference independent exists."""
    from latentcm import registry

    extractor = JudgeExtractor.load(registry.resolve("judge"))
    kinds = {kind: scoring.floor(extractor, references.reference_set(extractor, kind, count=128, cache_dir=tmp_path), 64)
             for kind in references.REFERENCE_KINDS}
    assert kinds["prompt-scenes"]["kid"] < kinds["independent"]["kid"]
    assert kinds["prompt-scenes"]["fid"] < kinds["independent"]["fid"]
    assert all(f["exact_match"] > 0.9 for f in kinds.values())  # the shipped judge reads real images right


def test_score_returns_every_metric_and_rounded_rounds():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)

    class Fake:  # a stand-in extractor: features from pixel means, uniform attribute probabilities
        def features(self, x):
            return x.reshape(len(x), 3, -1).mean(-1).numpy() + rng.normal(size=(len(x), 3))

        def probabilities(self, x):
            return {k: np.full((len(x), len(v)), 1.0 / len(v)) for k, v in world.ATTRIBUTES.items()}

        predict_from = staticmethod(JudgeExtractor.predict_from)

    feats = rng.normal(size=(20, 3))
    ref = references.Reference(feats, feats.mean(0), np.cov(feats, rowvar=False),
                               {k: np.array([world.ATTRIBUTES[k][0]] * 20) for k in references.HISTOGRAM_ATTRIBUTES},
                               Path("ref.npz"))
    prompts = ["a large red circle in the top left on a blue background"] * 6
    scores = scoring.score(images, prompts, Fake(), ref, bootstrap=5)
    assert set(scoring.SCORE_REQUIRED) | {"fid_ci"} == set(scores)
    assert scores["histogram_distance"] == {"size": 0.0, "position": 0.0}  # argmax of uniform = category 0
    assert scores["fid_ci"][0] <= scores["fid_ci"][1]
    small = scoring.score(images[:2], prompts[:2], Fake(), ref)
    assert small["precision"] is None and small["recall"] is None  # too few images for k = 3 neighbours
    assert scoring.rounded({"fid": 1.23456, "kid": None, "x": 1.23456}) == {"fid": 1.235, "kid": None, "x": 1.23456}


@pytest.mark.parametrize("args, needle", [
    (["--preset", "lcm", "--steps", "1"], "fixed rows"),
    (["--preset", "teacher", "--steps", "1,2"], "one sampler at one step count"),
    (["--samplers", "lcm", "--baseline", "ddim"], "is not one of --samplers"),
    (["--preset", "lcm", "--baseline", "ddim"], "--baseline is for the table1 preset"),
])
def test_preset_bad_input_is_one_line_and_exit_2(micro_lcm, args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(micro_lcm), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_removed_commands_are_gone_and_defaults_come_from_defaults():
    from latentcm import cli, defaults

    assert "evaluate-teacher" not in cli.cli.commands and "evaluate-lcm" not in cli.cli.commands
    assert presets.LCM_TABLE_ROWS[0].guidance == defaults.LCM_GUIDANCE
    Row = pipeline.Row
    assert presets.LCM_TABLE_ROWS[-1] == Row("teacher", "ddim", defaults.TEACHER_STEPS, defaults.TEACHER_GUIDANCE)
    assert pipeline.table_rows(["lcm", "ddim"], [1], None) == [Row("lcm", "lcm", 1, defaults.LCM_GUIDANCE),
                                                               Row("teacher", "ddim", 1, defaults.TEACHER_GUIDANCE)]
    for script in ("ship_teacher.py", "ship_lcm.py"):
        text = (ROOT / "scripts" / script).read_text()
        assert "evaluate-teacher" not in text and "evaluate-lcm" not in text and '"--preset"' in text


def test_older_results_files_read_with_the_current_keys():
    """Committed results.json files written before the renames read with the current keys and schemas."""
    old = {"clip_score": 80.0, "accuracy": 0.5, "attribute_accuracy": {"colour": 1.0},
           "rows": [{"accuracy": {"colour": 0.5}, "exact_accuracy": 0.25}]}
    assert results_file.upgrade_keys(old) == {"caption_score": 80.0, "exact_match": 0.5,
                                              "attribute_accuracy": {"colour": 1.0},
                                              "rows": [{"attribute_accuracy": {"colour": 0.5}, "exact_match": 0.25}]}
    assert results_file.upgrade_keys(results_file.upgrade_keys(old)) == results_file.upgrade_keys(old)
    reports = ROOT / "reports"
    results_file.validate_results(results_file.read_results(reports / "table1" / "results.json"))
    lcm = results_file.read_results(reports / "lcm" / "results.json")
    results_file.validate_results(lcm, presets.LCM_RESULTS_SCHEMA)
    teacher = results_file.read_results(reports / "teacher" / "results.json")  # written before KID: keys only
    for r in [*lcm["rows"], teacher]:
        assert "attribute_accuracy" in r and "accuracy" not in r
