"""Give an LCM an unguided first-step LoRA: the difference between it and a first-step-tuned copy of it, at rank R.

    python scripts/first_step_adapter.py --base lcm --tuned runs/probe/fs-l2-ema --rank 8 --out DIR \
        [--renoise keep-means]

TUNED is BASE after a first-step stage (``lcm distill --init-student BASE --ode-pair-share 1 --ode-pair-starts top
--omega-zero-share 1``: every sample the teacher's unguided ODE pair at the top point, the map of Algorithm 3's
first step at w = 0). That stage sharpens the w = 0 first step and costs the refining steps their guided response
through the shared weights (reports/guidance-modes/start-states, section 9), so only its difference is kept, as a
LoRA (``models.low_rank``: truncated SVD of every weight difference) that latentcm applies at the first step
(from pure noise) wherever the LCM reads w = 0 alone: g = 1, and real CFG between w = 0 predictions for a negative
prompt (``sampling.student``). DIR receives BASE's
folder with ``unguided_first_step.safetensors`` (diffusers LoRA keys, fp16) and sampling.json's ``unguided`` entry
({"first_step": that file, "renoise": RENOISE}); DIR may be BASE's own folder (then only those two change).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentcm import registry
from latentcm.bundle import SAMPLING_FILE, Bundle
from latentcm.defaults import RENOISE
from latentcm.errors import ModelError
from latentcm.files import atomic_path, write_json
from latentcm.models.low_rank import difference_energy, lora_from_difference

ADAPTER_FILE = "unguided_first_step.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the LCM (a name or folder)")
    ap.add_argument("--tuned", required=True, help="BASE after a first-step stage (an LCM folder)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--renoise", choices=RENOISE, default="keep-means",
                    help="the re-noising of unguided sampling (sampling.json's unguided renoise)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    base_dir = Path(registry.resolve(args.base))
    try:
        bundles = [Bundle.load(registry.resolve(name)) for name in (args.base, args.tuned)]
        for name, bundle in zip((args.base, args.tuned), bundles):
            if not bundle.is_lcm:
                raise ModelError(f"{name} is not an LCM folder")
    except ModelError as exc:
        sys.exit(f"error: {exc}")
    base, tuned = ({k: v.float() for k, v in b.unet.state_dict().items()} for b in bundles)
    lora = lora_from_difference(base, tuned, args.rank)
    energy = difference_energy(base, tuned, {k: v.half().float() for k, v in lora.items()})
    if args.out.resolve() != base_dir.resolve():
        shutil.copytree(base_dir, args.out, dirs_exist_ok=True)
    meta = {"base": args.base, "tuned": args.tuned, "rank": str(args.rank), "kept": f"{energy['kept']:.4f}",
            "one_dimensional_dropped": f"{energy['one_dimensional']:.4f}"}
    with atomic_path(args.out / ADAPTER_FILE) as tmp:
        save_file({k: v.half().contiguous() for k, v in lora.items()}, str(tmp), metadata=meta)
    settings_file = args.out / SAMPLING_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    write_json(settings_file, {**settings, "unguided": {"first_step": ADAPTER_FILE, "renoise": args.renoise}})
    Bundle.load(args.out)  # the folder loads, adapter merged
    size = (args.out / ADAPTER_FILE).stat().st_size / 1e6
    print(f"{args.out / ADAPTER_FILE}: rank {args.rank}, {sum(v.numel() for v in lora.values())} parameters, "
          f"{size:.2f} MB; keeps {100 * energy['kept']:.1f}% of the weight differences' squared norm "
          f"(1-D parameters, left out: {100 * energy['one_dimensional']:.2f}% of the whole)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
