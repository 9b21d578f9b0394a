"""scripts/w_pathway_separation.py: the time embedding's move between w = 0 and w, by hand on a planted projection."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import w_pathway_separation as probe  # noqa: E402

SCRIPT = Path(__file__).parents[1] / "scripts" / "w_pathway_separation.py"


def _unet(folder: Path, proj: torch.Tensor, lin: torch.Tensor) -> Path:
    unet = folder / "unet"
    unet.mkdir(parents=True)
    save_file({"time_embedding.cond_proj.weight": proj, "time_embedding.linear_1.weight": lin},
              str(unet / "diffusion_pytorch_model.safetensors"))
    return unet


def test_a_projection_of_the_lowest_cosine_moves_by_one_minus_its_cosine(tmp_path):
    """cond_proj reads only cos(1000 w f_min) (entry 255 of 256, f_min = 1e-4) and linear_1 scales it by 3: the
    move at w is 3 |cos(0.1 w) - 1|, and a zero projection (a fresh student) does not move at all."""
    proj = torch.zeros(2, 256)
    proj[0, 255] = 1.0
    unet = _unet(tmp_path / "planted", proj, torch.tensor([[3.0, 0.0]]))
    found = probe.separation(unet, [1.0, 10.0])
    assert found == pytest.approx([3 * (1 - math.cos(0.1)), 3 * (1 - math.cos(1.0))], abs=1e-3)
    assert probe.separation(_unet(tmp_path / "zero", torch.zeros(2, 256), torch.ones(1, 2)), [1.0]) == [0.0]


def test_a_unet_without_a_w_input_is_a_one_line_error(tmp_path):
    unet = tmp_path / "teacher" / "unet"
    unet.mkdir(parents=True)
    save_file({"time_embedding.linear_1.weight": torch.ones(1, 2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "teacher")], capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip() == (
        f"error: {tmp_path / 'teacher'}: the UNet has no time_embedding.cond_proj.weight (no w input)")
