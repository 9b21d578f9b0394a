"""Every multi-process job the tests check, in one `accelerate launch` (each launch starts three interpreters):

    accelerate launch --num_processes 2 tests/multiprocess_jobs.py TEACHER SHARD_SPEC OUT

Each job writes under OUT / its name; the tests (``two_process_runs`` in conftest.py) read the results.

* lcd: LCD on in-memory world data, 3 steps; each rank writes the digests of its student and target;
* ddp-shards: LCD streaming shards (rank r reads shards i % 2 == r), 3 steps; the main process saves the student;
* distill: `lcm distill --data SHARDS`, 2 steps;
* prepare: `lcm prepare` of the shards; each rank's stdout goes to prepare-stdout-RANK.txt.
"""
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402

from latentcm.bundle import Bundle  # noqa: E402
from latentcm.cli import main  # noqa: E402
from latentcm.training.consistency import LCDConfig, LCDTask  # noqa: E402
from latentcm.training.data.shapes import world_data  # noqa: E402
from latentcm.training.data.shards import ShardSource  # noqa: E402
from latentcm.training.loop import LoopConfig, fit, make_accelerator  # noqa: E402


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def lcd(acc, teacher: str, out: Path) -> None:
    bundle = Bundle.load(teacher)
    task = LCDTask(bundle.unet, bundle.scheduler_config, world_data(bundle, 8), LCDConfig(batch_size=2))
    done = fit(task, LoopConfig(max_steps=3, lr=1e-4, warmup=0, checkpoint_every=2), out, accelerator=acc)
    (out / f"rank-{acc.process_index}.json").write_text(json.dumps({
        "world": acc.num_processes, "done": done, "student": digest(task.student_unet),
        "target": digest(task.target_unet)}))


def ddp_shards(acc, teacher: str, spec: str, out: Path) -> None:
    bundle = Bundle.load(teacher)
    source = ShardSource(bundle, spec, 2, seed=3, process_index=acc.process_index, num_processes=acc.num_processes)
    task = LCDTask(bundle.unet, bundle.scheduler_config, source, LCDConfig(batch_size=2, seed=3))
    fit(task, LoopConfig(max_steps=3, lr=1e-3, warmup=0, checkpoint_every=10), out, accelerator=acc)
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in task.student_unet.state_dict().items()}, str(out / "student.safetensors"))


def run() -> None:
    teacher, spec, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    acc = make_accelerator()
    lcd(acc, teacher, root / "lcd")
    ddp_shards(acc, teacher, spec, root / "ddp-shards")
    main(["distill", "--teacher", teacher, "--out", str(root / "distill"), "--data", spec, "--max-steps", "2",
          "--batch-size", "2", "--validate-every", "0"])
    (root / "prepare").mkdir(parents=True, exist_ok=True)
    with open(root / f"prepare-stdout-{acc.process_index}.txt", "w") as f, contextlib.redirect_stdout(f):
        main(["prepare", "--model", teacher, "--data", spec, "--out", str(root / "prepare"), "--dtype", "float32"])


if __name__ == "__main__":
    run()
