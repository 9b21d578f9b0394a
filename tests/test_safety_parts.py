"""An SD-1.x teacher's safety checker and feature extractor travel into the distilled LCM folder and its export."""
import json

import pytest
import torch

from latentcm.bundle import Bundle
from latentcm.cli import main
from latentcm.export.pipeline import carry_safety_parts

QUIET = ["--max-steps", "2", "--batch-size", "2", "--num-data", "4", "--validate-every", "0"]


@pytest.fixture(scope="module")
def checked_teacher(micro_teacher, tmp_path_factory):
    """The micro teacher saved as diffusers saves Stable Diffusion 1.5: with a (tiny) safety checker and its
    feature extractor listed in model_index.json."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, projection_dim=16,
                                                      vision_config={**tiny, "image_size": 32, "patch_size": 8}))
    base = StableDiffusionPipeline.from_pretrained(micro_teacher, local_files_only=True)
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = StableDiffusionPipeline(**parts, safety_checker=checker.eval(), requires_safety_checker=True,
                                   feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                        crop_size={"height": 32, "width": 32}))
    dest = tmp_path_factory.mktemp("checked") / "teacher"
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="module")
def checked_lcm(checked_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("checked-lcm") / "lcm"
    main(["distill", "--teacher", str(checked_teacher), "--out", str(out), *QUIET])
    return out


def _index(folder):
    return json.loads((folder / "model_index.json").read_text())


def test_distilling_keeps_the_safety_checker(checked_teacher, checked_lcm):
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    teacher, lcm = _index(checked_teacher), _index(checked_lcm)
    assert lcm["_class_name"] == "LatentConsistencyModelPipeline"
    for part in ("safety_checker", "feature_extractor"):
        assert lcm[part] == teacher[part] and (checked_lcm / part).is_dir()
    assert lcm["requires_safety_checker"] is True
    assert (checked_lcm / "safety_checker" / "model.safetensors").read_bytes() == \
        (checked_teacher / "safety_checker" / "model.safetensors").read_bytes()
    pipe = LatentConsistencyModelPipeline.from_pretrained(checked_lcm, local_files_only=True)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.feature_extractor is not None
    assert "## Safety checker" in (checked_lcm / "README.md").read_text()
    assert Bundle.load(checked_lcm).is_lcm


def test_export_keeps_the_safety_checker(checked_lcm, tmp_path, capsys):
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    out = tmp_path / "release"
    main(["export", "--model", str(checked_lcm), "--out", str(out), "--fp16"])
    assert "  safety_checker/ (" in capsys.readouterr().err
    assert _index(out)["safety_checker"] == _index(checked_lcm)["safety_checker"]
    for kwargs in ({}, {"variant": "fp16", "torch_dtype": torch.float16}):
        pipe = LatentConsistencyModelPipeline.from_pretrained(out, local_files_only=True, **kwargs)
        assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)


def test_a_checker_without_safetensors_is_dropped_in_one_line(micro_teacher, tmp_path):
    source, folder = tmp_path / "source", tmp_path / "lcm"
    for part in ("safety_checker", "feature_extractor"):
        (source / part).mkdir(parents=True)
    (source / "safety_checker" / "pytorch_model.bin").write_bytes(b"pickle")
    index = {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (source / "model_index.json").write_text(json.dumps(index))
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"safety_checker": [None, None]}))
    carried, dropped = carry_safety_parts(source, folder)
    assert carried == [] and dropped.startswith("warning:") and "safetensors" in dropped and "\n" not in dropped
    assert _index(folder) == {"safety_checker": [None, None]} and not (folder / "safety_checker").exists()
    assert carry_safety_parts(micro_teacher, folder) == ([], None)  # nothing listed: nothing to say
