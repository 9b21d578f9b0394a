"""Consistency training as one Task of the one loop, with the variant as data (an :class:`LCDConfig`):

* LCD, Latent Consistency Distillation (LCM Algorithm 1): the less-noisy point z_{t_n} comes from the
  teacher and an ODE solver on the CFG-augmented PF-ODE (Eq. 7), with skipping interval k (Sec. 4.3);
* LCF, Latent Consistency Fine-tuning (LCM Sec. 4.4): ``target="same-noise"``, no teacher;
* LCM-LoRA (arXiv 2311.05556): :class:`LoRATask`, the same loss with a LoRA adapter as the student.

Batches are a pure function of ``(seed, step)``; the teacher's conditional and unconditional passes run
as one batched forward per solver stage (``solvers.augmented_step_batched``).

LCF's choices where the paper is silent, and why:
* the shared eps: consistency training's unbiased one-sample estimate of the ODE step, and what the
  re-implementations we know of do;
* the student starts from the LCM and the EMA target from the same weights (mu = 0.95 by default,
  the rate the LCM was distilled with; a slower EMA barely moves in a few hundred steps);
* k defaults to the LCM's own grid (T // original_inference_steps), so the exported scheduler keeps
  the grid the model was distilled on;
* only the low-noise half of the grid trains by default (t_{n+k} <= 499, ``LCDConfig.max_timestep``):
  a style is texture, decided in the last sampling steps, while layout and attributes are decided
  at high noise. Training every t let the biased one-sample target drift the high-noise end (objects
  shrank, backgrounds grew texture; attribute accuracy fell) before the style arrived; with t <= 499
  FID and style both improve and attributes hold (reports/lcf, README). This choice is ours, not
  the paper's;
* the text encoder and VAE stay frozen, as in distillation; only the UNet learns.

Mixed precision (``LoopConfig.mixed_precision``, via ``set_precision``): the frozen teacher and the EMA target
are stored in bf16 / fp16, the student keeps fp32 master weights (run under autocast by the loop); every UNet
output is cast to fp32 at the UNet's boundary (:class:`Float32Output`), so the x0 / eps conversions, c_skip /
c_out, the solver and the loss run in fp32 (the alpha / sigma table stays float64).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from .. import schedules
from ..guidance import guidance_scale_embedding, interval_omega
from ..models.denoiser import ConsistencyModel, Denoiser, make_student, restrict_cond_proj
from ..models.lora import ADAPTER, TARGET_ADAPTER, AdapterView, AdapterWeights, LoRAConfig, add_lora
from ..schedules import training_grid
from ..solvers import SOLVERS, augmented_step_batched
from .data.tensors import LCDData
from .lcd_config import COND_PROJ_INPUTS, LOSSES, TARGETS, LCDConfig, distance, draw_omega  # noqa: F401 -- re-exported
from .loop import ema_update, step_generator
from .precision import Float32Output, warn_slow_ema, wrap_float32  # noqa: F401 -- re-exported
from .starts import draw_starts, ode_pairs, ode_states


# --- the task ------------------------------------------------------------------------------------

class StudentTask:
    """What the tasks with one online student share (LCD / LCF here, guidance distillation in ``guided``): its
    checkpointed modules, the weights to ship, the move to the device and the optimizer's groups. Needs
    ``student_unet``, ``student``, ``teacher`` (or None), ``average_unet`` (a slow EMA of the student, or None),
    ``data``, ``alpha_bar`` and ``cfg.cond_proj_lr_scale``."""

    def modules(self):
        found = {"student": self.student_unet}
        if self.average_unet is not None:
            found["student_ema"] = self.average_unet
        return found

    @property
    def export_unet(self):
        """The weights to ship: the slow EMA of the student when one is kept, else the online student."""
        return self.average_unet if self.average_unet is not None else self.student_unet

    def parameters(self):
        return list(self.student_unet.parameters())

    def frozen_networks(self) -> list:
        """The networks that only run forward: the teacher (if any) and the slow EMA of the student (if kept)."""
        return [net for net in (self.teacher, self.average_unet) if net is not None]

    def prepare(self, accelerator) -> None:
        """Everything on the accelerator's device; the student's forward through ``accelerator.prepare``."""
        self.device = accelerator.device
        for net in self.frozen_networks():
            net.to(self.device)
        self.data = self.data.to(self.device)
        self.alpha_bar = self.alpha_bar.to(self.device)
        self.student = accelerator.prepare(self.student)

    def param_groups(self) -> list[dict]:
        """The optimizer's groups: the student, with the w projection apart at ``cond_proj_lr_scale`` x the lr."""
        proj = getattr(self.student_unet.time_embedding, "cond_proj", None)
        if self.cfg.cond_proj_lr_scale == 1.0 or proj is None:
            return [{"params": self.parameters()}]
        mine = {id(p) for p in proj.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in mine]},
                {"params": list(proj.parameters()), "lr_scale": self.cfg.cond_proj_lr_scale}]


class LCDTask(StudentTask):
    """LCM Algorithm 1 as a loop Task: online student, EMA target, frozen teacher, solver target.
    With ``cfg.target == "same-noise"`` it is LCF instead (no teacher, no solver; LCM Sec. 4.4).

    Args:
        teacher_unet: the frozen diffusion UNet (eps, v or sample prediction); None for LCF, where
            ``student`` (an LCM's UNet, with ``time_cond_proj_dim``) must be given.
        scheduler_config: its diffusers scheduler config (betas, prediction_type).
        data: cached latents and prompt encodings.
        cfg: the variant.
        student: the online network; by default ``make_student(teacher_unet, cfg.time_cond_proj_dim)``.
        preview_fn: preview_fn(student_unet, step, out_dir) writes a validation grid.
        guided_teacher: a guidance-distilled UNet (``training.guided``: takes w as ``timestep_cond``) that stands in
            for the teacher in the solver step: one pass per solver stage instead of the cond/uncond pair.
    """

    def __init__(self, teacher_unet, scheduler_config: dict, data: LCDData, cfg: LCDConfig, *,
                 student=None, preview_fn=None, guided_teacher=None):
        self.cfg, self.data, self.preview_fn = cfg, data, preview_fn
        self.one_pass = guided_teacher is not None
        if self.one_pass and cfg.target != "solver":
            raise ValueError("a guided teacher stands in for the teacher of LCD (target 'solver')")
        if (teacher_unet is None) != (cfg.target == "same-noise"):
            raise ValueError("LCD (target 'solver') needs a teacher UNet; LCF (target 'same-noise') takes none")
        if student is None and teacher_unet is None:
            raise ValueError("LCF needs the LCM's UNet as student")
        self._networks(teacher_unet, scheduler_config, student)
        if self.one_pass:  # the solver's x0_eps_fn is the guided teacher's single pass
            self.teacher = Denoiser(guided_teacher.requires_grad_(False).eval(), scheduler_config)
        self.alpha_bar = self.student.denoiser.alpha_bar  # [T] float64
        self.grid = self._grid(cfg.skip)  # [N]
        self.low_w_grid = self._grid(cfg.low_w_skip) if cfg.low_w_skip is not None else None
        self.solver = SOLVERS[cfg.solver]
        self.device = self.alpha_bar.device

    def _grid(self, skip: int) -> torch.Tensor:
        """The t_{n+k} of skipping interval ``skip`` (Sec. 4.3), up to ``max_timestep`` (the low-noise end only)."""
        grid = training_grid(len(self.alpha_bar), skip)  # [N]
        return grid if self.cfg.max_timestep is None else grid[grid <= self.cfg.max_timestep]

    def _networks(self, teacher_unet, scheduler_config: dict, student) -> None:
        """Online student theta, EMA target theta^- <- theta, frozen teacher (LCM Algorithm 1 line 2)."""
        if student is None and self.cfg.guidance_mode == "cfg":  # real-CFG mode: the teacher's UNet, no w input
            student = copy.deepcopy(teacher_unet).train().requires_grad_(True)
        self.student_unet = student if student is not None else make_student(
            teacher_unet, self.cfg.time_cond_proj_dim, cond_proj_init=self.cfg.cond_proj_init)
        if self.cfg.gradient_checkpointing:
            self.student_unet.enable_gradient_checkpointing()
        if self.cfg.cond_proj_inputs == "smooth":
            restrict_cond_proj(self.student_unet, self.cfg.omega_min, self.cfg.omega_max)
        self.target_unet = copy.deepcopy(self.student_unet).requires_grad_(False).eval()  # theta^- <- theta
        self.average_unet = (copy.deepcopy(self.student_unet).requires_grad_(False).eval()
                             if self.cfg.student_ema > 0 else None)  # slow EMA of theta, for sampling only
        self.teacher = (Denoiser(teacher_unet.requires_grad_(False).eval(), scheduler_config)
                        if teacher_unet is not None else None)
        self.student = ConsistencyModel(Denoiser(self.student_unet, scheduler_config))
        self.target = ConsistencyModel(Denoiser(self.target_unet, scheduler_config))

    def set_precision(self, dtype: torch.dtype) -> None:
        """Mixed precision: teacher and EMA target stored in ``dtype``; the student's weights stay fp32. Every
        network output is fp32 (``Float32Output``). Called by the loop before ``prepare``."""
        if self.teacher is not None:
            self.teacher.unet.to(dtype)
            wrap_float32(self.teacher, dtype)
        self.target_unet.to(dtype)
        warn_slow_ema(self.cfg.ema_decay, dtype)
        wrap_float32(self.target.denoiser, dtype)
        self.student_unet.float()  # fp32 master weights, also of a student built in half
        if self.average_unet is not None:
            self.average_unet.float()  # a slow EMA moves by less than half precision resolves
        wrap_float32(self.student.denoiser, torch.float32)

    def modules(self):
        found = super().modules()
        return {"student": found.pop("student"), "target": self.target_unet, **found}

    def frozen_networks(self) -> list:
        return [*super().frozen_networks(), self.target]

    def batch(self, step: int) -> dict:
        """Algorithm 1 line 3: (z, c) ~ D_z, t_{n+k} on the grid, w ~ U[w_min, w_max]; plus the noise of line 4."""
        g, b = step_generator(self.cfg.seed, step), self.cfg.batch_size
        if getattr(self.data, "streaming", False):  # shards: batch index -> stream position (data.shards)
            return self._streamed_batch(self.data.batch(step), g)
        idx = torch.randint(len(self.data), (b,), generator=g)
        t_start = self.grid[torch.randint(len(self.grid), (b,), generator=g)]  # t_{n+k} [B]
        noise = torch.randn((b, *self.data.latents.shape[1:]), generator=g)  # [B, C, h, w]
        omega = draw_omega(self.cfg, b, g)  # [B]
        idx_d = idx.to(self.data.latents.device)
        text = self._drop_prompts(self.data.text_states[idx_d], g)
        t_start, t_end, pure, ode, pair = self._times(t_start, omega, g)
        out = {"z0": self.data.latents[idx_d], "text": text, "noise": noise, "t_start": t_start, "t_end": t_end,
               "omega": omega, "pure_noise": pure, "ode_start": ode, "ode_pair": pair}
        return {key: v.to(self.device) for key, v in out.items()}

    def _times(self, t_start: torch.Tensor, omega: torch.Tensor,
               g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(t_{n+k}, t_n = max(t_{n+k} - k, 0), pure-noise start, ODE start, ODE pair) [B] from t_{n+k} and w."""
        t_start, k = self._low_w_times(t_start, omega, g)
        t_start, pure, ode, pair = draw_starts(self.cfg, t_start, self.grid.max(), g)
        return t_start, (t_start - k).clamp(min=0), pure, ode, pair

    def _low_w_times(self, t_start: torch.Tensor, omega: torch.Tensor,
                     g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, k) [B]; with ``low_w_skip`` the samples at w <= ``low_w_max`` take that k, their t_{n+k}
        redrawn on its grid (drawn last: without it the batch stream is unchanged)."""
        k = torch.full_like(t_start, self.cfg.skip)
        if self.low_w_grid is not None:
            low = omega <= self.cfg.low_w_max  # [B]
            redrawn = self.low_w_grid[torch.randint(len(self.low_w_grid), (len(t_start),), generator=g)]
            t_start = torch.where(low, redrawn, t_start)
            k = torch.where(low, torch.full_like(k, self.cfg.low_w_skip), k)
        return t_start, k

    def _drop_prompts(self, text: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``empty_prompt_share`` of the captions made the empty prompt (drawn last: a share of 0 keeps the stream)."""
        if self.cfg.empty_prompt_share == 0:
            return text
        drop = (torch.rand(len(text), generator=g) < self.cfg.empty_prompt_share).to(text.device)  # [B]
        return torch.where(drop.view(-1, 1, 1), self.data.uncond_states.to(text.device).expand_as(text), text)

    def _streamed_batch(self, chunk: LCDData, g: torch.Generator) -> dict:
        """A batch of a streaming source: its encoded samples, with t, noise and w drawn as for cached data."""
        b = len(chunk)
        t_start = self.grid[torch.randint(len(self.grid), (b,), generator=g)]  # t_{n+k} [B]
        noise = torch.randn((b, *chunk.latents.shape[1:]), generator=g)  # [B, C, h, w]
        omega = draw_omega(self.cfg, b, g)  # [B]
        text = self._drop_prompts(chunk.text_states, g)
        t_start, t_end, pure, ode, pair = self._times(t_start, omega, g)
        out = {"z0": chunk.latents, "text": text, "noise": noise, "t_start": t_start, "t_end": t_end, "omega": omega,
               "pure_noise": pure, "ode_start": ode, "ode_pair": pair}
        return {key: v.to(self.device) for key, v in out.items()}

    @torch.no_grad()
    def solver_target(self, z_s: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, text: torch.Tensor,
                      omega: torch.Tensor) -> torch.Tensor:
        """z_hat_{t_n} = z_s + (1 + w) Psi(z_s, c) - w Psi(z_s, 0)  (Algorithm 1 line 5); teacher, no grad.
        With a guided teacher: z_s + Psi(z_s, w, c), its one pass already guided (the CFG combination is
        exact for DDIM; for the second-order solvers it is the guided eps at each stage, as diffusers samples)."""
        if self.one_pass:
            w_emb = guidance_scale_embedding(omega, self.teacher.unet.config.time_cond_proj_dim).to(z_s.dtype)  # [B, d]

            def fn(x, t):  # one teacher forward, w as input
                return self.teacher(x, t, text, w_emb)
            return self.solver(z_s, t_start, t_end, fn, alpha_bar=self.alpha_bar)
        if self.cfg.omega_max == 0:  # the unguided ODE (w = 0 everywhere): the conditional pass alone
            return self.solver(z_s, t_start, t_end, lambda x, t: self.teacher(x, t, text), alpha_bar=self.alpha_bar)
        text_pair = torch.cat([text, self.data.uncond_states.expand_as(text)])  # [2B, L, D]: [c; empty prompt]

        def fn_pair(x2, t2):  # one batched teacher forward on [cond; uncond]
            return self.teacher(x2, t2, text_pair)
        return augmented_step_batched(self.solver, z_s, t_start, t_end, fn_pair, omega, alpha_bar=self.alpha_bar)

    def same_noise_target(self, z0: torch.Tensor, noise: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """LCF: z_{t_n} = alpha(t_n) z + sigma(t_n) eps, the same latent and noise as z_{t_{n+k}} (LCM Sec. 4.4)."""
        return schedules.add_noise(z0, noise, self.alpha_bar[t_end])

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Algorithm 1 lines 4-6 on one batch."""
        t_start, omega, text = batch["t_start"], batch["omega"], batch["text"]
        # 1. z_{t_{n+k}} ~ N(alpha(t_{n+k}) z, sigma^2(t_{n+k}) I) from the cached latent (line 4)
        z_s, pair_end = self._inputs(batch)  # [B, C, h, w], and the ODE pairs' end points (or None)
        # 2. the w embedding, fed to student and target as timestep_cond (LCM Sec. 4.2)
        w_emb = self.w_embedding(omega, z_s.dtype)  # [B, d], or None (LCM-LoRA)
        # 3. online prediction f_theta(z_{t_{n+k}}, w, c, t_{n+k})
        pred = self.student(z_s, t_start, text, w_emb)  # [B, C, h, w]
        with torch.no_grad():
            if pair_end is None:
                target = self._bootstrap_target(batch, z_s, w_emb, slice(None))
            else:  # an ODE pair's target is its trajectory's origin (``starts.ode_pairs``): no solver, no target pass
                target, pair = pred.new_empty(pred.shape, dtype=torch.float32), batch["ode_pair"]  # [B, C, h, w], [B]
                target[pair] = pair_end.float()
                if not pair.all():
                    target[~pair] = self._bootstrap_target(batch, z_s, w_emb, ~pair).float()
        # 6. distance d (line 6); the update (line 7) is the loop's, the EMA (line 8) is after_update
        loss = distance(pred.float(), target.float(), self.cfg.loss, self.cfg.huber_c)
        return loss, {"omega_mean": float(omega.mean())}

    def _bootstrap_target(self, batch: dict, z_s: torch.Tensor, w_emb: torch.Tensor | None, sel) -> torch.Tensor:
        """Algorithm 1 line 5 and the target network's output, on the samples ``sel`` picks (a mask, or all)."""
        t_start, t_end, omega, text = (batch[key][sel] for key in ("t_start", "t_end", "omega", "text"))
        # 4. guided solver target z_hat_{t_n} from the teacher (line 5), guided where t_{n+k} <= guidance_max_t
        w_teacher = interval_omega(omega, t_start, self.cfg.guidance_max_t)  # [B]
        z_hat = (self.solver_target(z_s[sel], t_start, t_end, text, w_teacher) if self.cfg.target == "solver"
                 else self.same_noise_target(batch["z0"][sel], batch["noise"][sel], t_end))
        # 5. target network f_theta^-(z_hat_{t_n}, w, c, t_n)
        return self.target(z_hat, t_end, text, None if w_emb is None else w_emb[sel])

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z_{t_{n+k}}, ODE pairs' end points or None): data noised to t_{n+k} (Alg. 1 line 4), or from ``starts``."""
        noise, t_start, text, omega = batch["noise"], batch["t_start"], batch["text"], batch["omega"]
        z_s = schedules.add_noise(batch["z0"], noise, self.alpha_bar[t_start])
        z_s = torch.where(batch["pure_noise"].view(-1, 1, 1, 1), noise.to(z_s.dtype), z_s)
        ode, pair, end = batch["ode_start"], batch["ode_pair"], None  # [B]

        def step(sel):  # one guided teacher step of the selected samples
            return lambda z, s, t: self.solver_target(z, s, t, text[sel], omega[sel])
        if ode.any():  # z_s is torch.where's own tensor: written in place
            z_s[ode] = ode_states(step(ode), noise[ode].to(z_s.dtype), t_start[ode], self.grid.max(),
                                  self.cfg.ode_start_steps)
        if pair.any():
            z_s[pair], end = ode_pairs(step(pair), noise[pair].to(z_s.dtype), t_start[pair], self.grid.max(),
                                       self.cfg.ode_pair_steps)
        return z_s, end

    def w_embedding(self, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The w embedding [B, d] fed as timestep_cond (LCM Sec. 4.2); None for a student without a w input (the
        real-CFG mode; LCM-LoRA, ``LoRATask.w_embedding``)."""
        if self.student_unet.config.get("time_cond_proj_dim") is None:
            return None
        return guidance_scale_embedding(omega, self.cfg.time_cond_proj_dim).to(dtype)

    def after_update(self, step: int) -> None:
        """Algorithm 1 line 8: theta^- <- stopgrad(mu theta^- + (1 - mu) theta); then the slow EMA of the
        student, if kept, with the usual warm-up min(decay, (1 + step) / (10 + step))."""
        ema_update(self.target_unet, self.student_unet, self.cfg.ema_decay)
        if self.average_unet is not None:
            ema_update(self.average_unet, self.student_unet, min(self.cfg.student_ema, (1 + step) / (10 + step)))

    def preview(self, step: int, out_dir: Path) -> None:
        """``preview_fn`` on the weights that would be exported (the slow EMA when one is kept)."""
        if self.preview_fn is not None:
            self.preview_fn(self.export_unet, step, out_dir)


class LoRATask(LCDTask):
    """LCM-LoRA as a loop Task: ``LCDTask`` whose student is a LoRA adapter on the teacher's own UNet.

    Args:
        teacher_unet: the diffusion UNet; it is frozen and the adapter(s) are injected into it (in place).
        scheduler_config: its diffusers scheduler config.
        data: cached latents and prompt encodings.
        cfg: the LCD variant (solver, k, w range, loss). ``cfg.ema_decay`` is mu of the target: 0 (default of
            ``lcm distill --lora``) uses the online adapter under no_grad, as the released scripts; > 0 keeps
            an EMA copy of the adapter weights only. ``cfg.time_cond_proj_dim`` is unused (no w embedding).
        lora: the adapter.
        preview_fn: preview_fn(unet, step, out_dir) writes a validation grid.
    """

    def __init__(self, teacher_unet, scheduler_config: dict, data: LCDData, cfg: LCDConfig, lora: LoRAConfig, *,
                 preview_fn=None):
        if cfg.target != "solver":
            raise ValueError("LCM-LoRA distils a teacher: LCDConfig.target must be 'solver'")
        if cfg.student_ema > 0:
            raise ValueError("a slow EMA of the student (student_ema) is for full-UNet distillation, not LCM-LoRA")
        self.lora_cfg = lora
        super().__init__(teacher_unet, scheduler_config, data, cfg, preview_fn=preview_fn)

    def _grid(self, skip: int) -> torch.Tensor:
        """The t_{n+k} of skipping interval ``skip`` (Sec. 4.3), up to ``max_timestep`` (the low-noise end only)."""
        grid = training_grid(len(self.alpha_bar), skip)  # [N]
        return grid if self.cfg.max_timestep is None else grid[grid <= self.cfg.max_timestep]

    def _networks(self, teacher_unet, scheduler_config: dict, student) -> None:
        """One UNet plays three parts: student (online adapter), teacher (adapters off), target (EMA adapter)."""
        unet = add_lora(teacher_unet, self.lora_cfg).train()
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.student_unet = self.target_unet = unet
        self.average_unet = None
        self.teacher = Denoiser(AdapterView(unet, None), scheduler_config)  # adapters off: the frozen teacher
        self.student = ConsistencyModel(Denoiser(unet, scheduler_config))
        self.lora = AdapterWeights(unet, ADAPTER)
        self.lora_target = None
        self.target = ConsistencyModel(Denoiser(unet, scheduler_config))  # called under no_grad by loss
        if self.cfg.ema_decay > 0:
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(self.lora_cfg.peft_config(), adapter_name=TARGET_ADAPTER)
            unet.set_adapter(ADAPTER)  # add_adapter activated the new one; the online adapter trains
            self.lora_target = AdapterWeights(unet, TARGET_ADAPTER)
            self.lora_target.load_state_dict(self.lora.state_dict())  # theta^- <- theta
            self.target = ConsistencyModel(Denoiser(AdapterView(unet, TARGET_ADAPTER), scheduler_config))

    def set_precision(self, dtype: torch.dtype) -> None:
        """Mixed precision: the frozen base UNet (the teacher) and the EMA adapter in ``dtype``, the online
        adapter fp32 (as diffusers' LCM-LoRA script); every network output is fp32 (``Float32Output``)."""
        online = {id(p) for p in self.lora.parameters()}
        with torch.no_grad():
            for p in self.student_unet.parameters():  # fp32 online adapter, also of a UNet built in half
                p.data = p.data.float() if id(p) in online else p.data.to(dtype)
        if self.lora_target is not None:
            warn_slow_ema(self.cfg.ema_decay, dtype)
        for denoiser in (self.teacher, self.target.denoiser, self.student.denoiser):
            wrap_float32(denoiser, dtype)

    def modules(self):
        """Only the adapter weights are checkpointed: the base UNet is the teacher folder's, unchanged."""
        found = {"lora": self.lora}
        if self.lora_target is not None:
            found["lora_target"] = self.lora_target
        return found

    def parameters(self):
        return list(self.lora.parameters())

    def w_embedding(self, omega: torch.Tensor, dtype: torch.dtype) -> None:
        """No w embedding: the guidance is distilled in (LCM-LoRA, arXiv 2311.05556)."""
        return None

    def after_update(self, step: int) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta over the adapter weights; nothing to do when mu = 0."""
        if self.lora_target is not None:
            ema_update(self.lora_target, self.lora, self.cfg.ema_decay)
