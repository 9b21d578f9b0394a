import os
from pathlib import Path

# Before torch loads OpenMP (and inherited by every subprocess a test starts): idle OpenMP threads sleep instead of
# spinning. Spinning threads on a shared 2-core machine burn the cores the other thread waits for: test_lora.py took
# 99 s of CPU with the default policy and 24 s with this one at load average 8.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One OpenMP / BLAS thread by default: in every subprocess (CLI runs, servers; micro models) and for numpy's BLAS.
# This process sets torch's own thread count below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def world_shards(tmp_path_factory):
    """16 train-split world images (seed 0) as 4 webdataset shards of 4 (read-only: copy before changing)."""
    from latentcm.cli import main

    out = tmp_path_factory.mktemp("world-shards") / "world"
    main(["world", "export", str(out), "--format", "shards", "--count", "16", "--shard-size", "4"])
    return out


@pytest.fixture(scope="session")
def micro_bundle(micro_teacher):
    from latentcm.bundle import Bundle

    return Bundle.load(micro_teacher)


@pytest.fixture(scope="session")
def micro_data(micro_bundle):
    """Six shapes-world train samples encoded by the micro teacher (LCDData; read-only tensors)."""
    from latentcm import world
    from latentcm.training.data.tensors import encode_pairs

    pairs = [(s.image, s.text) for s in world.iter_samples(0, 6)]
    return encode_pairs(micro_bundle.vae, micro_bundle.text_encoder, micro_bundle.tokenizer, pairs)


def launch_two_cpu_processes(args, timeout: int = 300):
    """CompletedProcess of `accelerate launch` with 2 CPU processes (gloo, one thread each) on a free port;
    ``args`` is a script path and its arguments, or ``-m module ...``."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def two_process_runs(micro_teacher, world_shards, tmp_path_factory):
    """(CompletedProcess, folder): one `accelerate launch` of 2 CPU processes running tests/multiprocess_jobs.py
    (data-parallel LCD in memory and on shards, `lcm distill` and `lcm prepare` on the 4 world shards); each
    job's outputs are in folder / its name. One launch for all: every launch starts three interpreters."""
    out = tmp_path_factory.mktemp("two-processes")
    script = Path(__file__).parent / "multiprocess_jobs.py"
    proc = launch_two_cpu_processes([script, micro_teacher, world_shards / "{000000..000003}.tar", out], timeout=600)
    return proc, out
