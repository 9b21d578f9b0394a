"""Stable Diffusion 1.5-scale distillation memory and speed: our LCD step against a diffusers-script baseline.

Builds SD 1.5-architecture components from their published configs with random weights (no download):
the UNet (block_out_channels 320/640/1280/1280, ~860M parameters), and for the baseline also the SD VAE and a
CLIP-L text encoder. Runs a few LCD steps at 256 px (32 x 32 latents), batch 1, gradient checkpointing, bf16,
on random latents and text states (what a latent-shard reader gives: no VAE or text encoder in memory), for
the full UNet and for LoRA rank 64. Each configuration runs in its own subprocess; it reports its peak
resident memory (getrusage maxrss) and seconds per step, and is stopped when its resident memory passes
--max-rss-gb (then reported as "exceeds N GB").

ours:     teacher bf16, EMA target bf16, student fp32 master weights under bf16 autocast, one batched
          [cond; uncond] teacher pass per solver stage; no VAE / text encoder (cached latents).
baseline: what diffusers' train_lcm_distill_sd_wds.py holds (train_lcm_distill_lora_sd_wds.py for LoRA):
          teacher bf16, student and EMA target fp32 (LoRA: the base UNet bf16, adapter fp32, no EMA), VAE fp32
          and text encoder bf16 in memory, separate cond / uncond teacher passes.

    nice -n 10 python benchmarks/bench_sd_scale.py --out reports/sd_scale/bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = ("lora-ours", "lora-baseline", "full-ours", "full-baseline")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
LATENT, TEXT_LEN, TEXT_DIM, LORA_RANK = 32, 77, 768, 64
# SDXL base 1.0's published UNet config (2.57B parameters); its LoRA step runs at 512 px (64 x 64 latents).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SDXL_LATENT, SDXL_TEXT_DIM, SDXL_POOLED = 64, 2048, 1280


def _rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _guard(limit_gb: float) -> None:
    """Stop this process (exit 3) as soon as its resident memory passes ``limit_gb``."""
    def watch():
        while True:
            if _rss_gb() > limit_gb:
                print(json.dumps({"exceeded_gb": limit_gb}), flush=True)
                os._exit(3)
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


def _unet(dtype, config=SD15_UNET):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in its storage dtype: no fp32 transient for half weights
    try:
        return UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(old)


def _data():
    import torch
    from latentcm.training.data.tensors import LCDData

    g = torch.Generator().manual_seed(0)
    return LCDData(torch.randn(8, 4, LATENT, LATENT, generator=g), torch.randn(8, TEXT_LEN, TEXT_DIM, generator=g),
                   torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g))


def _sdxl_data():
    """Random SDXL latents and packed conditioning (prompt states + [pooled | time_ids] row, ``models.sdxl``)."""
    import torch
    from latentcm.models import sdxl
    from latentcm.training.data.tensors import LCDData

    g = torch.Generator().manual_seed(0)
    ids = sdxl.time_ids(8 * SDXL_LATENT, 8 * SDXL_LATENT, batch=4)

    def cond(n):
        return sdxl.pack_condition(torch.randn(n, TEXT_LEN, SDXL_TEXT_DIM, generator=g),
                                   torch.randn(n, SDXL_POOLED, generator=g), ids[:n])
    return LCDData(torch.randn(4, 4, SDXL_LATENT, SDXL_LATENT, generator=g), cond(4), cond(1))


def _baseline_extras():
    """The VAE (fp32, as the script keeps it) and CLIP-L text encoder (bf16) the diffusers script holds."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**SD_VAE).requires_grad_(False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    return vae, text


def _separate_passes(task_cls):
    """A task whose teacher runs the cond and uncond branches as two forwards (the diffusers scripts)."""
    import torch
    from latentcm.solvers import augmented_step

    class Separate(task_cls):
        @torch.no_grad()
        def solver_target(self, z_s, t_start, t_end, text, omega):
            uncond = self.data.uncond_states.expand_as(text)
            return augmented_step(self.solver, z_s, t_start, t_end, lambda x, t: self.teacher(x, t, text),
                                  lambda x, t: self.teacher(x, t, uncond), omega, alpha_bar=self.alpha_bar)
    return Separate


def run_one(name: str, steps: int, optimizer: str = "adamw") -> dict:
    import torch
    from latentcm.models.lora import LoRAConfig
    from latentcm.training import consistency as C
    from latentcm.training.loop import LoopConfig, make_accelerator, prepare, train_step

    torch.manual_seed(0)
    kind, side = name.split("-")
    cfg = C.LCDConfig(batch_size=1, gradient_checkpointing=True, ema_decay=0.0 if kind == "lora" else 0.95,
                      omega_min=8.0 if kind == "lora" else 3.0, omega_max=8.0 if kind == "lora" else 15.0)
    loop = LoopConfig(max_steps=steps, lr=1e-6, warmup=0, schedule="constant", mixed_precision="bf16",
                      optimizer=optimizer)
    extras = _baseline_extras() if side == "baseline" else ()
    teacher = _unet(torch.bfloat16, SDXL_UNET if kind == "sdxllora" else SD15_UNET)
    unet_params = sum(p.numel() for p in teacher.parameters())
    if kind == "sdxllora":  # ours only: an SDXL-architecture LCM-LoRA step, to see whether it fits in 24 GB
        cfg = C.LCDConfig(batch_size=1, gradient_checkpointing=True, ema_decay=0.0, omega_min=8.0, omega_max=8.0)
        task = C.LoRATask(teacher, SCHEDULER, _sdxl_data(), cfg, LoRAConfig(rank=LORA_RANK, alpha=LORA_RANK, seed=0))
    elif kind == "lora":
        cls = _separate_passes(C.LoRATask) if side == "baseline" else C.LoRATask
        task = cls(teacher, SCHEDULER, _data(), cfg, LoRAConfig(rank=LORA_RANK, alpha=LORA_RANK, seed=0))
    elif side == "ours":
        task = C.LCDTask(teacher, SCHEDULER, _data(), cfg)  # student built bf16, made fp32 by set_precision
    else:
        class Baseline(_separate_passes(C.LCDTask)):
            def set_precision(self, dtype):  # teacher bf16; student AND target fp32 (the script's)
                self.teacher.unet.to(dtype)
                C._wrap(self.teacher, dtype)
                self.student_unet.float()
                self.target_unet.float()
                C._wrap(self.target.denoiser, torch.float32)
                C._wrap(self.student.denoiser, torch.float32)
        task = Baseline(teacher, SCHEDULER, _data(), cfg)
    acc = make_accelerator()
    opt = prepare(task, loop, acc)
    built_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        losses.append(train_step(task, opt, loop, step, acc)["loss"])
        times.append(time.perf_counter() - t0)
        print(json.dumps({"progress": name, "step": step, "s": round(times[-1], 1)}), file=sys.stderr, flush=True)
    timed = times[1:] or times  # the first step includes one-off allocation
    return {"config": name, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "rss_after_build_gb": round(built_gb, 2), "s_per_step": round(sum(timed) / len(timed), 1),
            "steps": steps, "trainable_params_m": round(sum(p.numel() for p in task.parameters()) / 1e6, 1),
            "unet_params_m": round(unet_params / 1e6, 1),
            "losses": [round(x, 5) for x in losses], "extras_in_memory": len(extras) > 0, "optimizer": optimizer,
            "resolution_px": 8 * (SDXL_LATENT if kind == "sdxllora" else LATENT)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-rss-gb", type=float, default=13.0, help="stop a configuration above this resident size")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw",
                    help="both sides (diffusers' scripts: --use_8bit_adam); adamw8bit needs bitsandbytes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _guard(args.max_rss_gb)
        print(json.dumps(run_one(args.one, args.steps, args.optimizer)), flush=True)
        return
    rows = []
    for name in args.configs.split(","):
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                               "--max-rss-gb", str(args.max_rss_gb), "--optimizer", args.optimizer],
                              capture_output=True, text=True)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        row = lines[-1] if lines else {}
        if "exceeded_gb" in row or proc.returncode == 3:
            row = {"config": name, "peak_rss_gb": f"exceeds {args.max_rss_gb:g} GB", "s_per_step": None}
        elif proc.returncode != 0:
            row = {"config": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["config"]: r for r in rows}
    ratios = {}
    for kind in ("lora", "full"):
        a, b = by.get(f"{kind}-ours", {}), by.get(f"{kind}-baseline", {})
        for key in ("peak_rss_gb", "s_per_step"):
            if isinstance(a.get(key), float) and isinstance(b.get(key), float) and b[key]:
                ratios[f"{kind}_{key}_ours_over_baseline"] = round(a[key] / b[key], 3)
    result = {"machine": "2-core shared CPU, 24 GiB RAM (shared), no GPU", "torch_threads": _threads(),
              "full_unet_state_estimate_gb": _state_estimate(),
              "resolution_px": "256 (SD 1.5 rows); 512 (sdxllora)", "latent": LATENT, "batch": 1, "precision": "bf16 autocast",
              "gradient_checkpointing": True, "lora_rank": LORA_RANK, "max_rss_gb": args.max_rss_gb,
              "optimizer": args.optimizer, "rows": rows, "ratios": ratios}
    print(json.dumps({"ratios": ratios}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def _state_estimate() -> dict:
    """Weights + gradients + AdamW moments of the full-UNet runs, from parameter counts (computed, not measured;
    activations excluded): student fp32 (4 B) + grad fp32 (4) + two moments fp32 (8) per parameter, plus teacher
    bf16 (2) and target (ours bf16: 2; baseline fp32: 4), baseline also VAE fp32 + text encoder bf16."""
    unet, vae, text = 859.52e6, 83.65e6, 123.06e6  # SD 1.5 UNet, SD VAE, CLIP-L text encoder parameters
    ours = unet * (16 + 2 + 2)
    base = unet * (16 + 2 + 4) + vae * 4 + text * 2
    return {"ours": round(ours / 2**30, 2), "baseline": round(base / 2**30, 2), "ratio": round(ours / base, 3),
            "note": "computed from parameter counts, not measured; activations excluded"}


def _threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
