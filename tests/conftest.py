import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A niced run (a developer testing beside a background training job) takes one core only.
torch.set_num_threads(1 if os.nice(0) > 0 else 2)


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory):
    """An untrained micro Stable Diffusion folder built from configs (seconds)."""
    from latentcm.models.components import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    dest = tmp_path_factory.mktemp("micro") / "teacher"
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


@pytest.fixture(scope="session")
def micro_lcm(micro_teacher, tmp_path_factory):
    """A micro LCM folder: two distillation steps of the micro teacher."""
    from latentcm.cli import main

    out = tmp_path_factory.mktemp("micro-lcm") / "lcm"
    main(["distill", "--teacher", str(micro_teacher), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
          "--num-data", "4", "--validate-every", "0"])
    return out


@pytest.fixture(scope="session")
def micro_judge(tmp_path_factory):
    """An untrained narrow judge folder."""
    from latentcm.models.judge import Judge

    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("judge") / "judge"
    Judge(width=8).save(dest)
    return dest
