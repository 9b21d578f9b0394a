"""Every training job of the ``lcm`` CLI as a data row of one runner:

    recipe            source model   data                      task                       exported as
    distill           teacher        shapes world or folder    LCDTask (LCM Algorithm 1)   LCM pipeline folder
    distill-lora      teacher        shapes world or folder    LoRATask (LCM-LoRA)         LCM-LoRA folder
    finetune          LCM            folder                    LCDTask, same-noise (LCF)   LCM pipeline folder
    finetune-teacher  teacher        folder                    UNetTask (plain diffusion)  pipeline or style LoRA
    distill-guidance  teacher        shapes world or folder    GuidanceTask (one-pass CFG)  guided-teacher folder

``run`` holds what they share: refuse to overwrite a run, load and check the source, encode the data
once (cached in OUT), build the task, ``loop.fit``, export on the main process. An exported LCM (or LCM-LoRA)
names its timestep schedule in sampling.json: ``Job.sampling_schedule``, else the source LCM's (finetune), else
"grid". A run refused before
training starts (bad settings, no usable data) leaves no OUT folder behind.
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import world
from ..bundle import Bundle
from ..defaults import GUIDED_OMEGA_MAX, LCM_GUIDANCE, LCM_SAMPLER, LCM_STEPS, LORA_OMEGA
from ..errors import ModelError
from ..export.lora import STYLE_ADAPTER, export_lcm_lora, export_style_lora
from ..export.pipeline import check_schedule, export_finetuned_teacher, export_guided_teacher, export_lcm
from ..images import save_grid
from ..models.denoiser import load_plain_student, load_student, student_weights
from ..models.lora import LoRAConfig, add_lora
from ..sampling.latents import sample_latents
from ..schedules import grid_size, skip_of, train_timesteps
from .consistency import LCDConfig, LCDTask, LoRATask
from .data.folders import LoadReport, folder_data
from .data.shapes import world_data
from .data.shards import ShardSource
from .diffusion import UNetTask
from .guided import GuidanceTask, w_following_probe
from .loop import LoopConfig, fit, make_accelerator
from .runs import check_fresh


@dataclass
class Job:
    """One run: what to train from, on what, with which settings, and where it goes.

    ``lcd`` is the consistency variant (distill, distill-lora, finetune); ``lora`` the adapter (distill-lora,
    finetune-teacher with an adapter); ``diffusion`` the plain-diffusion settings (finetune-teacher:
    batch_size, seed, ema_decay). ``data_dir`` is a user image folder, ``data_shards`` a webdataset shard spec
    (streamed and encoded per batch); without either, distillation uses ``num_data`` shapes-world images.
    """

    source: Path
    out: Path
    loop: LoopConfig
    lcd: LCDConfig | None = None
    lora: LoRAConfig | None = None
    data_dir: Path | None = None
    num_data: int = 10000
    data_shards: str | None = None    # webdataset shard spec, streamed (distill / distill-lora; ``data.shards``)
    shard_options: dict = field(default_factory=dict)  # ShardSource keywords (proportion_empty_prompts, ...)
    diffusion: dict = field(default_factory=dict)
    resume: bool = False
    command: str = ""
    data_cache: Path | None = None    # shared between runs (ablations); default OUT/data-cache.safetensors
    preview_fn: Callable | None = None  # replaces the validation grid (ablations pass a metric probe)
    export: bool = True
    init_student: Path | None = None  # distill: start the student from this LCM's UNet instead of the teacher's
    guided_teacher: Path | None = None  # distill: a guidance-distilled teacher (distill-guidance) for the solver step
    sampling_schedule: str | None = None  # the exported LCM's default timesteps (defaults.TIMESTEP_SCHEDULES);
    # None: "grid" (diffusers' selection) for distill / distill-lora, the source LCM's own for finetune (LCF)
    sampling_renoise: str | None = None  # the exported LCM's default re-noising (defaults.RENOISE); None: the
    # source LCM's own for finetune (LCF), else Algorithm 3's fresh noise
    on_data: Callable | None = None  # called with the data's LoadReport (None: the shapes world) before training


@dataclass
class Result:
    steps: int                 # optimizer steps done
    folder: Path | None        # OUT once finished and exported; None when a time limit stopped the run first
    report: LoadReport | None  # what a user folder's load skipped (None for the shapes world)


@dataclass(frozen=True)
class Recipe:
    """A training job as data: the model kind it starts from, its task and its export."""

    name: str
    source_kind: str                                   # "teacher" or "lcm"
    make_task: Callable[[Bundle, "object", list[str], Job], object]
    export: Callable[[object, Bundle, Job, dict], None]
    desc: str


# Each consistency recipe's LCDConfig defaults where they differ from LCDConfig's (LCM Sec. 5.1: w ~ U[2, 14],
# target EMA 0.95). LCM-LoRA (arXiv 2311.05556) distils at one fixed w, and its target is the online adapter.
LCD_DEFAULTS = {
    "distill": {},
    "distill-lora": {"omega_min": LORA_OMEGA, "omega_max": LORA_OMEGA, "ema_decay": 0.0},
    "finetune": {"target": "same-noise"},  # LCF: both consistency points from the same latent and noise
    # guidance distillation (Meng et al. 2023 stage 1): w from 0 (g = 1, unguided) to the top of the sweep (g = 12)
    "distill-guidance": {"omega_min": 0.0, "omega_max": GUIDED_OMEGA_MAX},
}


# The real-CFG mode's defaults (PCM's unguided-ODE recipe): w = 0 and a share of empty prompts to learn CFG's
# unconditional branch from.
CFG_MODE_DEFAULTS = {"omega_min": 0.0, "omega_max": 0.0, "empty_prompt_share": 0.1}


def lcd_config(recipe: str, **overrides) -> LCDConfig:
    """The LCDConfig of ``recipe`` (a key of ``LCD_DEFAULTS``): its defaults (and the real-CFG mode's when
    ``guidance_mode="cfg"``), then every override that is not None, so ``lcm distill --lora`` and
    ``recipes.run("distill-lora", ...)`` from Python start alike."""
    given = {k: v for k, v in overrides.items() if v is not None}
    mode = CFG_MODE_DEFAULTS if given.get("guidance_mode") == "cfg" else {}
    return LCDConfig(**{**LCD_DEFAULTS[recipe], **mode, **given})


# --- previews: few-step samples through the one sampling entry --------------------------------------

def make_preview(bundle: Bundle, original_inference_steps: int, num: int = 8, prompts: list[str] | None = None):
    """A validation-grid writer: LCM_STEPS-step samples at g = LCM_GUIDANCE of ``prompts``
    (default: ``num`` held-out world prompts)."""
    prompts = prompts[:num] if prompts else [s.text for s in world.iter_samples(7, num, "heldout")]
    num = len(prompts)
    states = bundle.encode_prompts(prompts)  # [num, L, D]
    size = bundle.default_size

    def preview(student_unet, step: int, out_dir: Path) -> None:
        p = next(student_unet.parameters())
        z = sample_latents(student_unet, bundle.scheduler_config, LCM_SAMPLER, states.to(p.device, p.dtype),
                           list(range(num)), bundle.latent_shape(size, size), steps=LCM_STEPS,
                           guidance=LCM_GUIDANCE, original_inference_steps=original_inference_steps)
        save_grid(bundle.decode(z.to(bundle.vae.device, bundle.vae.dtype)).float().cpu(),
                  Path(out_dir) / f"lcd-{step:07d}.png")
    return preview


def _grid_n(bundle: Bundle, skip: int) -> int:
    return grid_size(train_timesteps(bundle.scheduler_config), skip)


# --- the four recipes ----------------------------------------------------------------------------------

def _lcd_task(bundle, data, captions, job):
    preview = job.preview_fn or make_preview(bundle, _grid_n(bundle, job.lcd.skip))
    if job.lora is None:
        student = None if job.init_student is None else (
            load_plain_student(job.init_student, bundle.unet) if job.lcd.guidance_mode == "cfg"
            else load_student(job.init_student, bundle.unet, job.lcd.time_cond_proj_dim))
        guided = (load_student(job.guided_teacher, bundle.unet, job.lcd.time_cond_proj_dim)
                  if job.guided_teacher is not None else None)
        return LCDTask(bundle.unet, bundle.scheduler_config, data, job.lcd, student=student, preview_fn=preview,
                       guided_teacher=guided)
    if job.guided_teacher is not None:
        raise ValueError("a guided teacher (one-pass solver step) is for full-UNet distillation, not LCM-LoRA")
    return LoRATask(bundle.unet, bundle.scheduler_config, data, job.lcd, job.lora, preview_fn=preview)


def _guidance_task(bundle, data, captions, job):
    student = (load_student(job.init_student, bundle.unet, job.lcd.time_cond_proj_dim)
               if job.init_student is not None else None)
    task = GuidanceTask(bundle.unet, bundle.scheduler_config, data, job.lcd, student=student,
                        preview_fn=job.preview_fn)
    if job.preview_fn is None and hasattr(data, "latents"):  # cached data: log how the student follows w per t
        task.preview_fn = w_following_probe(task.teacher, bundle.scheduler_config, data)
    return task


def _lcf_task(bundle, data, captions, job):
    if job.lcd.target != "same-noise":
        raise ValueError("finetune runs LCF: LCDConfig(target='same-noise')")
    preview = job.preview_fn or make_preview(bundle, bundle.original_inference_steps, prompts=captions)
    return LCDTask(None, bundle.scheduler_config, data, job.lcd, student=bundle.unet.train().requires_grad_(True),
                   preview_fn=preview)


def _diffusion_task(bundle, data, captions, job):
    unet = bundle.unet.train().requires_grad_(True)
    if job.lora is not None:
        add_lora(unet, job.lora, adapter_name=STYLE_ADAPTER)  # base frozen; B = 0, so it starts as the teacher
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    d = job.diffusion
    return UNetTask(unet, ema, bundle.text_encoder, bundle.tokenizer, data.latents, None, d.get("seed", 0),
                    d.get("batch_size", 32), scheduler_config=bundle.scheduler_config,
                    ema_decay=d.get("ema_decay", 0.999), captions=captions, preview_fn=job.preview_fn)


def schedule_of(job: Job, bundle: Bundle) -> str:
    """The timestep schedule the exported model names in its sampling.json: the job's, else the source LCM's
    own (LCF keeps what its LCM samples on), else "grid"."""
    if job.sampling_schedule is not None:
        return check_schedule(job.sampling_schedule)
    return bundle.timestep_schedule if bundle.is_lcm else "grid"


def renoise_of(job: Job, bundle: Bundle) -> str:
    """The re-noising the exported LCM names in its sampling.json: the job's, else the source LCM's own (LCF keeps
    how its LCM samples), else fresh noise (LCM Algorithm 3)."""
    if job.sampling_renoise is not None:
        return job.sampling_renoise
    return bundle.traits.renoise if bundle.is_lcm else "fresh"


def _export_lcm(task, bundle, job, info):
    export_lcm(task.export_unet, bundle, job.out, info, skip=job.lcd.skip, schedule=schedule_of(job, bundle),
               renoise=renoise_of(job, bundle))


def _inherit_guidance_mode(job: Job, bundle: Bundle) -> Job:
    """LCF of a real-CFG LCM stays a real-CFG LCM (no w input to condition, w = 0)."""
    if not bundle.is_lcm or bundle.guidance_mode != "cfg" or job.lcd.guidance_mode == "cfg":
        return job
    return replace(job, lcd=replace(job.lcd, guidance_mode="cfg", omega_min=0.0, omega_max=0.0))


def _export_lcm_lora(task, bundle, job, info):
    export_lcm_lora(task.student_unet, bundle.scheduler_config, job.out, {**info, "lora": asdict(job.lora)},
                    skip=job.lcd.skip, schedule=schedule_of(job, bundle))


def _export_lcf(task, bundle, job, info):
    info = {**info, "lcd": {**asdict(job.lcd), "solver": "none (LCF: same-noise target, no teacher)"},
            "title": f"Latent Consistency Model fine-tuned from `{job.source}`",
            "intro": (f"Latent Consistency Fine-tuning (LCF; Luo et al. 2023, Sec. 4.4) of the LCM `{job.source}` "
                      f"on the image folder `{job.data_dir}` ({info['data_report']}), made with latentcm: no "
                      "teacher, both consistency points from the same latent and noise.")}
    export_lcm(task.export_unet, bundle, job.out, info, skip=job.lcd.skip, schedule=schedule_of(job, bundle),
               guidance=bundle.default_guidance, renoise=renoise_of(job, bundle))


def _export_guided(task, bundle, job, info):
    export_guided_teacher(task.export_unet, bundle, job.out, info)


def _export_diffusion(task, bundle, job, info):
    if job.lora is not None:
        export_style_lora(task.ema, job.out, {
            "teacher": str(job.source), "data": str(job.data_dir), "report": info["data_report"],
            "steps": info["steps"], "command": job.command or "# Python API: recipes.run('finetune-teacher')"})
        return
    export_finetuned_teacher(task.ema, bundle, job.out, {
        k: info[k] for k in ("command", "teacher", "data", "steps", "data_report", "minutes_this_session")})


RECIPES = {r.name: r for r in (
    Recipe("distill", "teacher", _lcd_task, _export_lcm, "distill"),
    Recipe("distill-lora", "teacher", _lcd_task, _export_lcm_lora, "distill"),
    Recipe("finetune", "lcm", _lcf_task, _export_lcf, "finetune"),
    Recipe("finetune-teacher", "teacher", _diffusion_task, _export_diffusion, "finetune-teacher"),
    Recipe("distill-guidance", "teacher", _guidance_task, _export_guided, "guidance"),
)}


# --- the runner -----------------------------------------------------------------------------------------

def load_source(path: str | Path, kind: str) -> Bundle:
    """The source model folder, refused (ModelError) when it is not of the recipe's kind."""
    bundle = Bundle.load(path)
    if kind == "lcm" and not bundle.is_lcm:
        raise ModelError(f"{bundle.path} is a diffusion teacher; LCF fine-tunes an LCM (distil one with `lcm distill`)")
    if kind == "teacher" and bundle.is_lcm:
        raise ModelError(f"{bundle.path} is an LCM; fine-tune it with `lcm finetune` (LCF), or distil a teacher")
    return bundle


def lcm_skip(bundle: Bundle) -> int:
    """An LCM's own skipping interval k = T // original_inference_steps (LCF keeps the grid it was distilled on)."""
    if not bundle.is_lcm:
        raise ModelError(f"{bundle.path} is a diffusion teacher; LCF fine-tunes an LCM (distil one with `lcm distill`)")
    return skip_of(train_timesteps(bundle.scheduler_config), bundle.original_inference_steps)


def _data(bundle: Bundle, job: Job, write: bool, accelerator=None):
    """(LCDData or ShardSource, captions, report): shards or a user folder when given, else the shapes world
    (distillation only)."""
    cache = job.data_cache or job.out / "data-cache.safetensors"
    if job.data_shards is not None:
        if job.lcd is None:
            raise ValueError("webdataset shards stream consistency training only (distill); pass an image folder")
        source = ShardSource(bundle, job.data_shards, job.lcd.batch_size, job.lcd.seed,
                             process_index=accelerator.process_index if accelerator else 0,
                             num_processes=accelerator.num_processes if accelerator else 1, **job.shard_options)
        return source, [], source.report
    if job.data_dir is not None:
        data, report, captions = folder_data(bundle, Path(job.data_dir), cache, write=write)
        return data, captions, report
    return world_data(bundle, job.num_data, cache, write=write), [], None


def _info(job: Job, recipe: Recipe, done: int, report, seconds: float, processes: int) -> dict:
    """What the exported card reports about the run."""
    return {"command": job.command, "teacher": str(job.source), "steps": done,
            "num_data": job.num_data if job.data_dir is None and job.data_shards is None
            else str(job.data_shards or job.data_dir), "data": str(job.data_shards or job.data_dir),
            "data_report": report.summary() if report is not None else f"{job.num_data} shapes-world images",
            "lcd": asdict(job.lcd) if job.lcd is not None else {},
            "guided_teacher": str(job.guided_teacher) if job.guided_teacher is not None else None,
            "loop": {k: v for k, v in asdict(job.loop).items() if k != "extra_meta"},
            "minutes_this_session": round(seconds / 60, 2), "processes": processes, "recipe": recipe.name}


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet; None when it exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def run(name: str, job: Job, accelerator=None) -> Result:
    """Run recipe ``name`` (a key of ``RECIPES``) for ``job``; see the module docstring."""
    recipe = RECIPES[name]
    acc = accelerator if accelerator is not None else make_accelerator()
    t0, out = time.time(), Path(job.out)
    check_fresh(out, job.resume)
    bundle = load_source(job.source, recipe.source_kind)
    if job.lcd is None and name in LCD_DEFAULTS:  # the recipe's own settings, as the CLI's defaults give
        job = replace(job, lcd=lcd_config(name, skip=lcm_skip(bundle) if name == "finetune" else None))
    job = _inherit_guidance_mode(job, bundle) if name == "finetune" else job
    schedule_of(job, bundle)  # an unknown timestep schedule fails before any encoding
    if job.lcd is not None:
        _grid_n(bundle, job.lcd.skip)  # a bad k fails before any encoding
    if job.guided_teacher is not None:
        student_weights(job.guided_teacher)
    if job.init_student is not None:
        student_weights(job.init_student)  # and so does a folder without weights
    made = _first_missing(out)  # removed again if the run is refused before training starts
    try:
        out.mkdir(parents=True, exist_ok=True)
        data, captions, report = _data(bundle, job, write=acc.is_main_process, accelerator=acc)
        task = recipe.make_task(bundle, data, captions, job)
        if job.on_data is not None and acc.is_main_process:
            job.on_data(report)  # what was loaded and skipped, before the (long) training
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    done = fit(task, job.loop, out, job.resume, desc=recipe.desc, accelerator=acc)
    if done < job.loop.max_steps or not job.export:
        return Result(done, None, report)
    if acc.is_main_process:
        recipe.export(task, bundle, job, _info(job, recipe, done, report, time.time() - t0, acc.num_processes))
    acc.wait_for_everyone()
    return Result(done, out, report)
