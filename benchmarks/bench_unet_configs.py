"""Training-step cost of candidate teacher UNets on this machine (the latent-size/model-size
trade-off behind the shipped default). Prints seconds per fwd+bwd at batch 32 and the ratio to
the shipped configuration, all measured in the same run.

    python benchmarks/bench_unet_configs.py [--repeats 5]
"""
import argparse
import time

import torch
from diffusers import UNet2DConditionModel

from latentcm.models import components as C

P = C.get_preset("default")
SHIPPED = C.unet_config(P, P.text_hidden, 16)
CANDIDATES = {
    "shipped: 16x16x4, (64,128,128), attention at 8x8 and 4x4": SHIPPED,
    "SD-style: 16x16x4, (64,128,128), attention at 16x16 and 8x8": {
        **SHIPPED, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "f=8 latents: 8x8x4, (64,128,128), attention at 4x4 and 2x2": {**SHIPPED, "sample_size": 8},
    "tiny: 16x16x4, (32,64,64), attention at 8x8 and 4x4": {
        **SHIPPED, "block_out_channels": [32, 64, 64], "norm_num_groups": 32, "attention_head_dim": 4},
}


def time_step(cfg: dict, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    s = cfg["sample_size"]
    z, text = torch.randn(32, 4, s, s), torch.randn(32, P.max_length, P.text_hidden)
    t = torch.randint(0, 1000, (32,))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        unet(z, t, text).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times), sum(p.numel() for p in unet.parameters()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = None
    print(f"{'configuration':62s} {'params':>8s} {'s/step':>8s} {'ratio':>6s}")
    for name, cfg in CANDIDATES.items():
        sec, params = time_step(cfg, args.repeats)
        base = base or sec
        print(f"{name:62s} {params:7.2f}M {sec:8.3f} {sec / base:6.2f}")


if __name__ == "__main__":
    main()
