"""Every LCM producer writes its timestep schedule: a fresh distillation and an LCF fine-tune carry sampling.json,
and sampling them (Bundle.generate, `lcm generate`) uses the timesteps the producer named."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentcm import world
from latentcm.bundle import SAMPLING_FILE, Bundle
from latentcm.errors import ModelError
from latentcm.export.pipeline import check_schedule, write_sampling
from latentcm.schedules import lcm_timesteps, refine_timesteps, train_timesteps
from latentcm.training import recipes
from latentcm.training.consistency import LCDConfig
from latentcm.training.loop import LoopConfig

STEPS = 4
LOOP = LoopConfig(max_steps=1, warmup=1, checkpoint_every=1)


def _distill(teacher, out, schedule=None):
    job = recipes.Job(teacher, out, LOOP, lcd=LCDConfig(batch_size=1), num_data=2, sampling_schedule=schedule)
    return recipes.run("distill", job).folder


def _finetune(lcm, out, data_dir, schedule=None):
    lcd = LCDConfig(target="same-noise", batch_size=1, skip=recipes.lcm_skip(Bundle.load(lcm)))
    job = recipes.Job(lcm, out, LOOP, lcd=lcd, data_dir=data_dir, sampling_schedule=schedule)
    return recipes.run("finetune", job).folder


def _images(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(2):
        s = world.make_sample(0, i)
        s.image.save(d / f"im{i}.png")
        rows.append(json.dumps({"file_name": f"im{i}.png", "text": s.text}))
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def produced(micro_teacher, tmp_path_factory):
    """{name: (folder, schedule it should carry)}: distill (default, refine), finetune of the refine LCM."""
    root = tmp_path_factory.mktemp("sampling-file")
    grid = _distill(micro_teacher, root / "distill")
    refine = _distill(micro_teacher, root / "distill-refine", "refine")
    lcf = _finetune(refine, root / "lcf", _images(root))
    return {"distill": (grid, "grid"), "distill-refine": (refine, "refine"), "finetune": (lcf, "refine")}


def _timesteps(bundle: Bundle, schedule: str) -> list[int]:
    select = refine_timesteps if schedule == "refine" else lcm_timesteps
    return select(STEPS, train_timesteps(bundle.scheduler_config), bundle.original_inference_steps).tolist()


@pytest.mark.parametrize("name", ["distill", "distill-refine", "finetune"])
def test_producer_writes_the_schedule_and_generate_samples_on_it(produced, name):
    folder, schedule = produced[name]
    assert json.loads((folder / SAMPLING_FILE).read_text()) == {"timestep_schedule": schedule}
    assert f"Timestep schedule: `{schedule}`" in (folder / "README.md").read_text()
    bundle = Bundle.load(folder)
    assert bundle.timestep_schedule == schedule
    own = bundle.generate(["a red circle"], [0], steps=STEPS)
    explicit = bundle.generate(["a red circle"], [0], timesteps=_timesteps(bundle, schedule))
    other = "grid" if schedule == "refine" else "refine"
    assert _timesteps(bundle, schedule) != _timesteps(bundle, other)
    assert torch.equal(own, explicit)
    assert not torch.equal(own, bundle.generate(["a red circle"], [0], timesteps=_timesteps(bundle, other)))


def test_lcm_generate_uses_the_schedule_its_producer_wrote(produced, tmp_path):
    from latentcm.cli import main

    folder, schedule = produced["finetune"]
    ts = ",".join(map(str, _timesteps(Bundle.load(folder), schedule)))
    args = ["generate", "a red circle", "--model", str(folder), "--num-images", "1"]
    main([*args, "--steps", str(STEPS), "--out", str(tmp_path / "own.png")])
    main([*args, "--timesteps", ts, "--out", str(tmp_path / "explicit.png")])
    own, explicit = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("own", "explicit"))
    assert np.array_equal(own, explicit)


def test_finetune_takes_a_given_schedule_over_the_source_lcm(produced, tmp_path):
    folder, _ = produced["distill-refine"]
    out = _finetune(folder, tmp_path / "lcf-grid", _images(tmp_path), "grid")
    assert Bundle.load(out).timestep_schedule == "grid"


def test_an_unknown_schedule_is_one_line_before_anything_is_written(micro_teacher, tmp_path):
    with pytest.raises(ModelError, match="unknown timestep schedule 'cosine'") as err:
        _distill(micro_teacher, tmp_path / "out", "cosine")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ModelError):
        write_sampling(tmp_path, "cosine")
    assert check_schedule("refine") == "refine"
    assert json.loads(write_sampling(tmp_path, "refine").read_text()) == {"timestep_schedule": "refine"}
