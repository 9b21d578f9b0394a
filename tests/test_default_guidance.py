"""An LCM folder's own default g (its sampling.json's "guidance") is the g every entry point uses when the caller
names none: lcm generate, lcm compare, the lcm and table1 presets, lcm serve, and the release export, whose single
file bakes it in. The shipped LCM names one, and takes a negative prompt (distilled from w = 0)."""
import json
import shutil

import pytest

from latentcm import registry
from latentcm.bundle import Bundle
from latentcm.defaults import TEACHER_GUIDANCE
from latentcm.evaluation import compare, pipeline, presets
from latentcm.evaluation.pipeline import Row
from latentcm.export.pipeline import write_sampling
from latentcm.serve.validate import Limits, parse_request

G = 3.0


@pytest.fixture(scope="module")
def lcm_g3(micro_lcm, tmp_path_factory):
    """The micro LCM with a sampling.json that recommends g = 3."""
    folder = tmp_path_factory.mktemp("default-g") / "lcm-g3"
    shutil.copytree(micro_lcm, folder)
    schedule = json.loads((micro_lcm / "sampling.json").read_text())["timestep_schedule"]
    write_sampling(folder, schedule, guidance=G)
    return folder


def test_the_folder_default_is_the_generate_default(lcm_g3, micro_lcm):
    b = Bundle.load(lcm_g3)
    assert b.defaults[2] == G and b.sampling_options().guidance == G
    assert Bundle.load(micro_lcm).defaults[2] != G
    assert (b.generate(["a red circle"], [0], steps=1) == b.generate(["a red circle"], [0], "lcm", 1, G)).all()


def test_presets_and_compare_sample_the_lcm_at_its_default(lcm_g3, micro_teacher):
    rows = presets.lcm_preset_rows(G)
    assert {r.guidance for r in rows if r.model == "lcm"} == {G}
    assert {r.guidance for r in rows if r.model == "teacher"} == {TEACHER_GUIDANCE}
    assert {r.guidance for r in presets.lcm_preset_rows(G, 5.0)} == {5.0}  # --guidance: every row
    table, _, tops = presets.table1_rows(["lcm", "ddim"], [1], None, ceiling=True, lcm_guidance=G)
    assert table == pipeline.table_rows(["lcm", "ddim"], [1], None, lcm_guidance=G)
    assert [r.guidance for r in table] == [G, TEACHER_GUIDANCE] and tops[0].guidance == G
    bundles = {"lcm": Bundle.load(lcm_g3), "teacher": Bundle.load(micro_teacher)}
    lcm_rows = [r for r, _, _ in compare.timed_rows(bundles, "a red circle", [0], compare.compare_rows(G)[:1])]
    assert lcm_rows == [Row("lcm", "lcm", 1, G)] and compare.compare_rows(G)[-1].guidance == TEACHER_GUIDANCE


def test_serve_defaults_to_the_served_lcm_g():
    lcm = parse_request({"prompt": "a red circle"}, Limits(lcm_guidance=G))
    teacher = parse_request({"prompt": "a red circle", "model": "teacher"}, Limits(lcm_guidance=G))
    assert lcm.guidance == G and teacher.guidance == TEACHER_GUIDANCE
    assert parse_request({"prompt": "a red circle", "guidance": 5}, Limits(lcm_guidance=G)).guidance == 5


def test_release_export_recommends_and_bakes_the_default(lcm_g3, tmp_path):
    from safetensors import safe_open

    from latentcm.export.release import export_release, split_front_matter

    out = export_release(lcm_g3, tmp_path / "release", single_file=True)
    assert json.loads((out / "sampling.json").read_text())["guidance"] == G
    card = (out / "README.md").read_text()
    front, _ = split_front_matter(card)
    assert "guidance_scale: 3\n" in card.split("---")[1] and f"guidance_scale={G:g})" in card
    assert f"guidance scale {G:g} is baked" in card and front["library_name"] == "diffusers"
    with safe_open(str(out / "release.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["guidance_scale"]) == G


def test_the_shipped_lcm_names_its_g_and_takes_a_negative_prompt(tmp_path):
    from latentcm.cli import main

    shipped = Bundle.load(registry.resolve("lcm"))
    settings = json.loads((registry.resolve("lcm") / "sampling.json").read_text())
    assert shipped.unguided_w0 and shipped.defaults[2] == settings["guidance"] < 8.5
    out = tmp_path / "neg.png"
    main(["generate", "a star on a white background", "--negative-prompt", "red", "--num-images", "1",
          "--out", str(out)])
    assert out.is_file()
