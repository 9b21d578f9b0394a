"""`lcm prepare` under `accelerate launch`: one warning line when fewer processes run than were asked for."""
import os
import socket
import subprocess
import sys

import pytest

from latentcm.training.data.prepare import launch_warning

SIMPLE_LAUNCHER = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29500"}  # accelerate launch --num_processes 2 without --multi_gpu


@pytest.mark.parametrize("env, running, words", [
    ({}, 1, None),                                                     # plain `lcm prepare`
    ({"ACCELERATE_MIXED_PRECISION": "no"}, 1, None),                   # accelerate launch, one process asked
    ({**SIMPLE_LAUNCHER, "WORLD_SIZE": "2"}, 2, None),                 # --multi_gpu: two run
    (SIMPLE_LAUNCHER, 1, "asked for several processes but started one"),
    ({"WORLD_SIZE": "4"}, 2, "asked for 4 processes but 2 run"),
])
def test_launch_warning(env, running, words):
    found = launch_warning(env, running)
    assert found is None if words is None else (words in found and found.startswith("warning:") and "\n" not in found)


def test_accelerate_launch_without_multi_gpu_warns_once(micro_teacher, world_shards, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "latentcm.cli", "prepare", "--model", str(micro_teacher),
           "--data", str(world_shards / "{000000..000003}.tar"), "--out", str(tmp_path / "latents")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("warning: accelerate launch was asked for several processes but started one") == 1
    assert "process 1/1" in proc.stderr and proc.stdout.startswith("16 samples in 4 latent shards")
