"""How far apart does an LCM's w pathway put w = 0 and the guided w? A weights-only probe, no sampling.

    python scripts/w_pathway_separation.py MODEL [MODEL ...] [--omegas 0.25,0.5,1,2,5,10] [--out FILE.json]

The w input enters the UNet as ``time_embedding.cond_proj(e(w))`` added to the timestep's sinusoid before
``time_embedding.linear_1`` (LCM Sec. 4.2). For each paper w (g = 1 + w) the script prints the norm of
``linear_1(cond_proj(e(w)) - cond_proj(e(0)))``: how different the time embedding's pre-activation is at w from the
unguided w = 0, the same at every t. A pathway that gives the w = 0 map its own features has a step between 0 and
the smallest guided w; one that varies smoothly gives nearby w nearby embeddings.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentcm import registry
from latentcm.errors import ModelError
from latentcm.guidance import guidance_scale_embedding


def separation(unet_dir: Path, omegas: list[float]) -> list[float]:
    """||linear_1 (cond_proj(e(w)) - cond_proj(e(0)))|| for each w (biases cancel in the difference)."""
    weights = {k: v for f in registry.safetensors_files(unet_dir) for k, v in load_file(f).items()}  # shards too
    proj, lin = weights["time_embedding.cond_proj.weight"].float(), weights["time_embedding.linear_1.weight"].float()
    emb = guidance_scale_embedding(torch.tensor([0.0, *omegas]), proj.shape[1])  # [1 + n, d]
    moved = (emb[1:] - emb[:1]) @ proj.T @ lin.T  # [n, time_embed_dim]
    return [round(float(v), 3) for v in moved.norm(dim=1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LCM folders or registry names (a UNet with a w input)")
    ap.add_argument("--omegas", default="0.25,0.5,1,2,5,10", help="paper w values (g = 1 + w), comma-separated")
    ap.add_argument("--out", default=None, help="JSON file the results are written to")
    args = ap.parse_args()
    try:
        omegas = [float(v) for v in args.omegas.split(",")]
    except ValueError:
        raise SystemExit(f"error: --omegas is a comma-separated list of numbers, got {args.omegas!r}") from None
    rows = {}
    for name in args.models:
        try:
            rows[name] = separation(registry.resolve(name) / "unet", omegas)
        except ModelError as exc:
            raise SystemExit(f"error: {name}: {exc}") from None
        except KeyError as exc:
            raise SystemExit(f"error: {name}: the UNet has no {exc.args[0]} (no w input)") from None
    print("| model | " + " | ".join(f"w = {w:g}" for w in omegas) + " |")
    print("|---|" + "---|" * len(omegas))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"omegas": omegas, "separation": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
