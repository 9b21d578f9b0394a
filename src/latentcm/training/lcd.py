"""Latent Consistency Distillation (LCD, LCM Algorithm 1; paper-spec §5) as a Task of the one training loop.

The variant is data: an :class:`LCDConfig` (solver, skipping interval k, w range, EMA rate, distance).
VAE latents and text embeddings are computed once and cached (:class:`LCDData`); batches are a pure
function of ``(seed, index)``; the teacher's conditional and unconditional passes run as one batched
forward per solver stage (``solvers.augmented_step_batched``).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import schedules, world
from ..guidance import guidance_scale_embedding
from ..models.denoiser import ConsistencyModel, Denoiser, make_student, sample_student
from ..solvers import SOLVERS, augmented_step_batched
from .loop import LoopConfig, check_fresh, fit, make_accelerator
from ..images import save_grid
from ..models.components import encode_text
from .teacher import ema_update, step_generator

LOSSES = ("l2", "huber")
# How the less-noisy point z_{t_n} is made: "solver" = LCD (Algorithm 1 line 5, teacher + ODE solver);
# "same-noise" = LCF (paper-spec §9): alpha(t_n) z + sigma(t_n) eps with the SAME z and eps as z_{t_{n+k}}.
TARGETS = ("solver", "same-noise")
DATA_WORLD_SEED = 1238          # shapes-world seed of the distillation data (the teacher stages use 1234..1237)
PREVIEW_OMEGA = 7.5             # paper w of the validation grid (diffusers guidance_scale 8.5)
PREVIEW_STEPS = 4


@dataclass(frozen=True)
class LCDConfig:
    """One LCD variant (paper-spec §4-§7). w is the paper's guidance (SD guidance scale g = 1 + w)."""

    solver: str = "ddim"               # Psi: ddim | dpm-solver | dpm-solver++
    skip: int = 20                     # k, skipping interval; grid t_i = k i - 1, N = T // k points
    omega_min: float = 2.0             # w ~ U[omega_min, omega_max]; the paper's [2, 14]
    omega_max: float = 14.0
    ema_decay: float = 0.95            # mu of the target network (diffusers); the paper's 0.999943 selectable
    loss: str = "l2"                   # distance d: l2 | huber (pseudo-Huber)
    huber_c: float = 0.001             # c of the pseudo-Huber distance
    batch_size: int = 16               # per process
    seed: int = 0                      # batch seed
    time_cond_proj_dim: int = 256      # size of the w embedding fed as timestep_cond
    target: str = "solver"             # solver (LCD, needs a teacher) | same-noise (LCF, teacher-free)
    max_timestep: int | None = None    # train only t_{n+k} <= this (LCF: texture lives at low noise); None: all
    gradient_checkpointing: bool = False  # memory, not math: the student recomputes activations in backward

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if not 0 <= self.omega_min <= self.omega_max:
            raise ValueError(f"need 0 <= omega_min <= omega_max, got [{self.omega_min}, {self.omega_max}]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.huber_c <= 0 or self.batch_size < 1 or self.skip < 1:
            raise ValueError("huber_c must be > 0, batch_size >= 1 and skip >= 1")
        if self.max_timestep is not None and self.max_timestep < self.skip - 1:
            raise ValueError(f"max_timestep {self.max_timestep} leaves no grid point "
                             f"(the lowest is k - 1 = {self.skip - 1})")


def training_grid(num_train_timesteps: int, skip: int) -> torch.Tensor:
    """The skipping grid [k - 1, 2k - 1, ..., N k - 1], N = T // k (paper-spec §4.1, §12.2).

    k must satisfy T // (T // k) == k, so the exported LCMScheduler (original_inference_steps = N)
    rebuilds exactly this grid.
    """
    n = num_train_timesteps // skip
    if n < 1 or num_train_timesteps // n != skip:
        ok = sorted({num_train_timesteps // m for m in range(1, num_train_timesteps + 1)}, key=lambda v: abs(v - skip))
        raise ValueError(f"skip k={skip} does not give a grid that LCMScheduler can rebuild "
                         f"(T // (T // k) != k for T={num_train_timesteps}); nearest valid: {sorted(ok[:2])}")
    return schedules.skipping_grid(num_train_timesteps, n)  # [N]


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """d(x, y): mean squared error, or pseudo-Huber mean(sqrt((x - y)^2 + c^2) - c)  (paper-spec §5.1, §7)."""
    if kind == "l2":
        return torch.mean((pred - target) ** 2)
    if kind == "huber":
        return torch.mean(torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


# --- cached data ---------------------------------------------------------------------------------

@dataclass
class LCDData:
    """D_z of Algorithm 1 line 1: latents and prompt encodings, computed once."""

    latents: torch.Tensor        # [N, C, h, w]: VAE posterior mode * scaling_factor
    text_states: torch.Tensor    # [N, L, D]: the caption of each latent
    uncond_states: torch.Tensor  # [1, L, D]: the empty prompt

    def __len__(self) -> int:
        return len(self.latents)

    def to(self, device) -> "LCDData":
        return LCDData(self.latents.to(device), self.text_states.to(device), self.uncond_states.to(device))

    def save(self, path: Path, meta: dict) -> Path:
        """Atomic safetensors file (temp file, then rename)."""
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in asdict(self).items()}, str(tmp), metadata={"meta": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, meta: dict) -> "LCDData | None":
        """The cached data, or None when there is none or it was made with other settings."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            if json.loads(fh.metadata().get("meta", "{}")) != meta:
                return None
        return cls(**load_file(str(path)))


def _pixels(images) -> torch.Tensor:
    """PIL images or uint8 [H, W, 3] arrays -> float [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_pairs(vae, text_encoder, tokenizer, pairs, batch_size: int = 64, *, text_fn=None,
                 uncond_fn=None) -> LCDData:
    """Encode (image, caption) pairs once: latents = mode of q(z | x) * scaling_factor, and text states.

    ``text_fn(captions)`` / ``uncond_fn()`` replace the single-encoder encoding (SDXL: ``Bundle.encode_prompts``
    and ``Bundle.encode_uncond(1)``, the packed two-encoder conditioning with zero uncond embeddings).
    """
    pairs = list(pairs)
    if text_fn is None:
        def text_fn(captions):
            return encode_text(text_encoder, tokenizer, captions)
    if uncond_fn is None:
        def uncond_fn():
            return encode_text(text_encoder, tokenizer, [""])
    latents, states = [], []
    for i in range(0, len(pairs), batch_size):
        images, captions = zip(*pairs[i:i + batch_size])
        x = _pixels(images).to(vae.device, vae.dtype)
        latents.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)  # [b, C, h, w]
        states.append(text_fn(list(captions)))  # [b, L, D]
    uncond = uncond_fn()  # [1, L, D]
    # contiguous: the in-memory data must match the cached file bit for bit (a resumed run reads the cache)
    return LCDData(torch.cat(latents).float().cpu().contiguous(), torch.cat(states).float().cpu(), uncond.float().cpu())


def bundle_text_fns(bundle) -> dict:
    """``encode_pairs`` keywords for a bundle whose conditioning is not a single encoder's (SDXL); else {}."""
    if not getattr(bundle, "is_sdxl", False):
        return {}
    return {"text_fn": bundle.encode_prompts, "uncond_fn": lambda: bundle.encode_uncond(1)}


def world_data(bundle, num_data: int, cache: Path | None = None, seed: int = DATA_WORLD_SEED,
               write: bool = True) -> LCDData:
    """Shapes-world training pairs encoded by the teacher's VAE and text encoder, cached in ``cache``."""
    meta = {"num_data": num_data, "world_seed": seed, "teacher": str(bundle.path)}
    found = LCDData.load(cache, meta) if cache is not None else None
    if found is not None:
        return found
    pairs = ((s.image, s.text) for s in world.iter_samples(seed, num_data, "train"))
    data = encode_pairs(bundle.vae, bundle.text_encoder, bundle.tokenizer, pairs, **bundle_text_fns(bundle))
    if cache is not None and write:
        data.save(cache, meta)
    return data


# --- the task ------------------------------------------------------------------------------------

class LCDTask:
    """LCM Algorithm 1 as a loop Task: online student, EMA target, frozen teacher, solver target.
    With ``cfg.target == "same-noise"`` it is LCF instead (no teacher, no solver; paper-spec §9).

    Args:
        teacher_unet: the frozen diffusion UNet (eps, v or sample prediction); None for LCF, where
            ``student`` (an LCM's UNet, with ``time_cond_proj_dim``) must be given.
        scheduler_config: its diffusers scheduler config (betas, prediction_type).
        data: cached latents and prompt encodings.
        cfg: the variant.
        student: the online network; by default ``make_student(teacher_unet, cfg.time_cond_proj_dim)``.
        preview_fn: preview_fn(student_unet, step, out_dir) writes a validation grid.
    """

    def __init__(self, teacher_unet, scheduler_config: dict, data: LCDData, cfg: LCDConfig, *,
                 student=None, preview_fn=None):
        self.cfg, self.data, self.preview_fn = cfg, data, preview_fn
        if (teacher_unet is None) != (cfg.target == "same-noise"):
            raise ValueError("LCD (target 'solver') needs a teacher UNet; LCF (target 'same-noise') takes none")
        if student is None and teacher_unet is None:
            raise ValueError("LCF needs the LCM's UNet as student")
        self.student_unet = student if student is not None else make_student(teacher_unet, cfg.time_cond_proj_dim)
        if cfg.gradient_checkpointing:
            self.student_unet.enable_gradient_checkpointing()
        self.target_unet = copy.deepcopy(self.student_unet).requires_grad_(False).eval()  # theta^- <- theta
        self.teacher = (Denoiser(teacher_unet.requires_grad_(False).eval(), scheduler_config)
                        if teacher_unet is not None else None)
        self.student = ConsistencyModel(Denoiser(self.student_unet, scheduler_config))
        self.target = ConsistencyModel(Denoiser(self.target_unet, scheduler_config))
        self.alpha_bar = Denoiser(self.target_unet, scheduler_config).alpha_bar  # [T] float64
        self.grid = training_grid(len(self.alpha_bar), cfg.skip)  # [N]
        if cfg.max_timestep is not None:
            self.grid = self.grid[self.grid <= cfg.max_timestep]  # t_{n+k} drawn from the low-noise end only
        self.solver = SOLVERS[cfg.solver]
        self.device = self.alpha_bar.device

    def modules(self):
        return {"student": self.student_unet, "target": self.target_unet}

    def parameters(self):
        return list(self.student_unet.parameters())

    def prepare(self, accelerator) -> None:
        """Everything on the accelerator's device; the student's forward through ``accelerator.prepare``."""
        self.device = accelerator.device
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.target.to(self.device)
        self.data = self.data.to(self.device)
        self.alpha_bar = self.alpha_bar.to(self.device)
        self.student = accelerator.prepare(self.student)

    def batch(self, step: int) -> dict:
        """Algorithm 1 line 3: (z, c) ~ D_z, t_{n+k} on the grid, w ~ U[w_min, w_max]; plus the noise of line 4."""
        g, b, k = step_generator(self.cfg.seed, step), self.cfg.batch_size, self.cfg.skip
        idx = torch.randint(len(self.data), (b,), generator=g)
        t_start = self.grid[torch.randint(len(self.grid), (b,), generator=g)]  # t_{n+k} [B]
        noise = torch.randn((b, *self.data.latents.shape[1:]), generator=g)  # [B, C, h, w]
        omega = self.cfg.omega_min + (self.cfg.omega_max - self.cfg.omega_min) * torch.rand(b, generator=g)  # [B]
        idx_d = idx.to(self.data.latents.device)
        out = {"z0": self.data.latents[idx_d], "text": self.data.text_states[idx_d], "noise": noise,
               "t_start": t_start, "t_end": (t_start - k).clamp(min=0), "omega": omega}  # t_n = max(t_{n+k} - k, 0)
        return {key: v.to(self.device) for key, v in out.items()}

    @torch.no_grad()
    def solver_target(self, z_s: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, text: torch.Tensor,
                      omega: torch.Tensor) -> torch.Tensor:
        """z_hat_{t_n} = z_s + (1 + w) Psi(z_s, c) - w Psi(z_s, 0)  (Algorithm 1 line 5); teacher, no grad."""
        text_pair = torch.cat([text, self.data.uncond_states.expand_as(text)])  # [2B, L, D]: [c; empty prompt]

        def fn_pair(x2, t2):  # one batched teacher forward on [cond; uncond]
            return self.teacher(x2, t2, text_pair)
        return augmented_step_batched(self.solver, z_s, t_start, t_end, fn_pair, omega, alpha_bar=self.alpha_bar)

    def same_noise_target(self, z0: torch.Tensor, noise: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """LCF: z_{t_n} = alpha(t_n) z + sigma(t_n) eps, the same latent and noise as z_{t_{n+k}} (paper-spec §9)."""
        return schedules.add_noise(z0, noise, self.alpha_bar[t_end])

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Algorithm 1 lines 4-6 on one batch."""
        t_start, t_end, omega, text = batch["t_start"], batch["t_end"], batch["omega"], batch["text"]
        # 1. z_{t_{n+k}} ~ N(alpha(t_{n+k}) z, sigma^2(t_{n+k}) I) from the cached latent (line 4)
        z_s = schedules.add_noise(batch["z0"], batch["noise"], self.alpha_bar[t_start])  # [B, C, h, w]
        # 2. the w embedding, fed to student and target as timestep_cond (paper-spec §6)
        w_emb = self.w_embedding(omega, z_s.dtype)  # [B, d], or None (LCM-LoRA)
        # 3. online prediction f_theta(z_{t_{n+k}}, w, c, t_{n+k})
        pred = self.student(z_s, t_start, text, w_emb)  # [B, C, h, w]
        with torch.no_grad():
            # 4. guided solver target z_hat_{t_n} from the teacher (line 5)
            z_hat = (self.solver_target(z_s, t_start, t_end, text, omega) if self.cfg.target == "solver"
                     else self.same_noise_target(batch["z0"], batch["noise"], t_end))
            # 5. target network f_theta^-(z_hat_{t_n}, w, c, t_n)
            target = self.target(z_hat, t_end, text, w_emb)
        # 6. distance d (line 6); the update (line 7) is the loop's, the EMA (line 8) is after_update
        loss = distance(pred.float(), target.float(), self.cfg.loss, self.cfg.huber_c)
        return loss, {"omega_mean": float(omega.mean())}

    def w_embedding(self, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The w embedding [B, d] fed as timestep_cond (paper-spec §6); LCM-LoRA has none (``lora.LoRATask``)."""
        return guidance_scale_embedding(omega, self.cfg.time_cond_proj_dim).to(dtype)

    def after_update(self, step: int) -> None:
        """Algorithm 1 line 8: theta^- <- stopgrad(mu theta^- + (1 - mu) theta)."""
        ema_update(self.target_unet, self.student_unet, self.cfg.ema_decay)

    def preview(self, step: int, out_dir: Path) -> None:
        if self.preview_fn is not None:
            self.preview_fn(self.student_unet, step, out_dir)


# --- a whole run ---------------------------------------------------------------------------------

def make_preview(bundle, original_inference_steps: int, num: int = 8, prompts: list[str] | None = None):
    """A validation-grid writer: PREVIEW_STEPS-step LCM samples at w = PREVIEW_OMEGA of ``prompts``
    (default: ``num`` held-out world prompts)."""
    prompts = prompts[:num] if prompts else [s.text for s in world.iter_samples(7, num, "heldout")]
    num = len(prompts)
    states = bundle.encode_prompts(prompts)  # [num, L, D]
    size = bundle.unet.config.sample_size * bundle.vae_factor

    def preview(student_unet, step: int, out_dir: Path) -> None:
        p = next(student_unet.parameters())
        z = sample_student(student_unet, bundle.scheduler_config, states.to(p.device, p.dtype), list(range(num)),
                           bundle.latent_shape(size, size), steps=PREVIEW_STEPS, omega=PREVIEW_OMEGA,
                           original_inference_steps=original_inference_steps)
        save_grid(bundle.decode(z.to(bundle.vae.device, bundle.vae.dtype)).float().cpu(),
                  Path(out_dir) / f"lcd-{step:07d}.png")
    return preview


def distill(teacher_dir: str | Path, out: str | Path, cfg: LCDConfig, loop_cfg: LoopConfig, *, num_data: int,
            resume: bool = False, command: str = "", accelerator=None, preview_fn=None, export: bool = True,
            data_cache: Path | None = None, data_dir: Path | None = None,
            lora=None) -> tuple[int, Path | None]:
    """Distil the teacher folder into an LCM: train with ``fit``, then export a diffusers folder into ``out``.

    ``data_dir``: a user image folder to distil on instead of ``num_data`` shapes-world images.
    ``lora``: a ``lora.LoRAConfig`` makes it LCM-LoRA (``lora.LoRATask``; ``out`` receives LoRA files instead).
    ``preview_fn(student_unet, step, out_dir)`` replaces the validation grid (``make_preview``);
    ablations pass a metric probe, ``export=False`` and a ``data_cache`` shared between runs.

    Returns:
        (steps done, ``out`` once the run finished, or None when a time limit stopped it first).
    """
    from ..models.bundle import Bundle
    from .export import export_lcm

    acc = accelerator if accelerator is not None else make_accelerator()
    out, t0 = Path(out), time.time()
    check_fresh(out, resume)
    bundle = Bundle.load(teacher_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = training_grid(bundle.scheduler_config.get("num_train_timesteps", 1000), cfg.skip)  # fail early
    cache = data_cache or out / "data-cache.safetensors"
    if data_dir is not None:
        from .lcf import folder_data

        data, _, _ = folder_data(bundle, Path(data_dir), cache, write=acc.is_main_process)
    else:
        data = world_data(bundle, num_data, cache, write=acc.is_main_process)
    preview = preview_fn or make_preview(bundle, original_inference_steps=len(grid))
    if lora is None:
        task = LCDTask(bundle.unet, bundle.scheduler_config, data, cfg, preview_fn=preview)
    else:
        from .lora import LoRATask

        task = LoRATask(bundle.unet, bundle.scheduler_config, data, cfg, lora, preview_fn=preview)
    done = fit(task, loop_cfg, out, resume, desc="distill", accelerator=acc)
    if done < loop_cfg.max_steps or not export:
        return done, None
    if acc.is_main_process:
        info = {"command": command, "teacher": str(teacher_dir), "steps": done,
                "num_data": num_data if data_dir is None else str(data_dir),
                "lcd": asdict(cfg), "loop": {k: v for k, v in asdict(loop_cfg).items() if k != "extra_meta"},
                "minutes_this_session": round((time.time() - t0) / 60, 2), "processes": acc.num_processes}
        if lora is None:
            export_lcm(task.student_unet, bundle, out, info, skip=cfg.skip)
        else:
            from .lora import export_lcm_lora

            export_lcm_lora(task.student_unet, bundle.scheduler_config, out, {**info, "lora": asdict(lora)},
                            skip=cfg.skip)
    acc.wait_for_everyone()
    return done, out
