"""Defaults with one definition each: samplers, step counts, guidance, skipping interval.

Guidance convention: g is the usual classifier-free guidance scale of diffusers (g = 1 turns it off);
the LCM paper's w is g - 1 (arXiv 2310.04378, Eq. 6 writes CFG as (1 + w) eps_c - w eps_u).
"""
TEACHER_SOLVERS = ("ddim", "dpm-solver", "dpm-solver++")  # CFG sampling, two UNet passes per step
TRAILING = "-trailing"  # sampler suffix: trailing timestep spacing (first step at t = T - 1, from pure noise)
# Teacher samplers: each solver with the teacher config's spacing (SD: "leading", first step t = 751 of 4
# steps), and with trailing spacing, which starts from t = 999 like the LCM sampler.
TEACHER_SAMPLERS = (*TEACHER_SOLVERS, *(s + TRAILING for s in TEACHER_SOLVERS))
LCM_SAMPLER = "lcm"                                        # multistep consistency sampling (Algorithm 3)
# How the LCM sampler picks its timesteps: "grid" = diffusers' LCMScheduler selection from the skipping grid;
# "refine" = schedules.refine_timesteps (after the first step, every step at low noise). An LCM folder's
# sampling.json names its own; "grid" where it has none.
TIMESTEP_SCHEDULES = ("grid", "refine")
# How an LCM forms its guided prediction: "embedding" (LCM Sec. 4.2: w is an input, one pass per step) or "cfg"
# (real classifier-free guidance over a student distilled on the unguided ODE: two passes, takes negative prompts)
GUIDANCE_MODES = ("embedding", "cfg")
# The LCM sampler's re-noising noise between steps: "fresh" (LCM Algorithm 3, diffusers' LCMScheduler) or
# "keep-means" (its per-channel spatial means taken from the step's noise estimate; sampling.lcm). An LCM
# folder's sampling.json may name one; "fresh" where it has none.
RENOISE = ("fresh", "keep-means")
CFG_LCM_GUIDANCE = 2.0            # default g of a real-CFG LCM whose sampling.json names none (small g: PCM, TDD)

LCM_OMEGA = 7.5                   # paper w of the shipped LCM's default and of training previews
LCM_GUIDANCE = 1.0 + LCM_OMEGA    # g = 8.5
LCM_STEPS = 4                     # the usual few-step setting (Table 1's 4-step column)
TEACHER_SAMPLER = "ddim"          # the teacher's default sampler
TEACHER_GUIDANCE = 7.5            # g of the teacher's samplers (Stable Diffusion's usual default)
TEACHER_STEPS = 50

COMPARE_TEACHER_STEPS = 25        # the teacher row of `lcm compare` and the demo: DDIM 25 steps with CFG

TEACHER_DEFAULTS = (TEACHER_SAMPLER, TEACHER_STEPS, TEACHER_GUIDANCE)   # (sampler, steps, guidance scale g)
LCM_DEFAULTS = (LCM_SAMPLER, LCM_STEPS, LCM_GUIDANCE)

SKIP = 20                         # k of the skipping-step grid (Sec. 4.3); N = T // k = 50 for T = 1000
OMEGA_RANGE = (2.0, 14.0)         # w ~ U[w_min, w_max] in LCD training (Sec. 5.1: [2, 14])
LORA_OMEGA = 7.5                  # the fixed w of LCM-LoRA distillation (arXiv 2311.05556)
GUIDED_OMEGA_MAX = 11.0           # guidance distillation: w ~ U[0, 11], g = 1 (unguided) .. 12 (the sweep's top)
IMG2IMG_STRENGTH = 0.5            # fraction of the skipping grid kept: 1 ignores the image's layout
