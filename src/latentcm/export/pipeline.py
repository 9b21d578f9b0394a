"""Export a distilled LCM as a complete diffusers ``LatentConsistencyModelPipeline`` folder with a model card
(SDXL teachers: a ``StableDiffusionXLPipeline`` folder with an ``LCMScheduler``)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..bundle import SAMPLING_FILE, Bundle
from ..defaults import (CFG_LCM_GUIDANCE, GUIDANCE_MODES, LCM_GUIDANCE, LCM_STEPS, RENOISE, SKIP,
                        TIMESTEP_SCHEDULES)
from ..errors import ModelError
from ..files import write_json, write_text
from ..schedules import lcm_scheduler_config, skip_of

LCM_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [latent-consistency-model, lcm, latentcm, text-to-image]
---

# {title}

{intro} {guidance_note}

## Command that made it

```bash
{command}
```

## Distillation settings

| setting | value |
|---|---|
| ODE solver | {solver} |
| skipping interval k / training grid | {skip} / `LCMScheduler` `original_inference_steps` {n_grid} (t = {grid_first}, ..., {grid_last}) |
| guidance w ~ U[w_min, w_max] (paper convention; g = 1 + w) | [{omega_min}, {omega_max}]{omega_zero} |
| teacher guided at | {guided_at} |
| w-embedding entries the w projection reads | {proj_inputs} |
| target EMA rate mu | {ema_decay} |
| distance | {loss} |
| steps x batch | {steps} x {batch} ({processes} process(es)) |
| learning rate | {lr} |
| seed | {seed} |

## Use

{use}

Timestep schedule: `{schedule}` ({schedule_note}). latentcm (`lcm generate`, `Bundle`) samples on it by default; it
is named in `{sampling_file}`, which diffusers ignores.{renoise_note}
"""
KEEP_MEANS_NOTE = """

Re-noising between steps: `keep-means` (`lcm generate --renoise`, named in `{sampling_file}`). Each step's fresh
noise has its per-channel spatial means replaced by those of the step's own noise estimate. diffusers'
`LCMScheduler` draws fresh noise, which gives different images. To sample as latentcm does, swap the scheduler:
`pipe.scheduler = KeepMeansLCMScheduler.from_config(pipe.scheduler.config)`, importing
`from latentcm.export.scheduler import KeepMeansLCMScheduler`."""

EMBEDDING_NOTE = ("The UNet takes the guidance w as a `timestep_cond` embedding (`time_cond_proj_dim` {dim}), so "
                  "sampling needs one UNet pass per step and takes no negative prompt.")
UNGUIDED_W0_NOTE = ("The UNet takes the guidance w as a `timestep_cond` embedding (`time_cond_proj_dim` {dim}): one UNet "
                    "pass per step. It was distilled from w = 0, where it is the teacher's unguided consistency model, "
                    "so latentcm also takes a negative prompt (`lcm generate --negative-prompt`): then each step runs "
                    "real CFG between its w = 0 predictions for the prompt and for the negative, two passes per step, "
                    "at scale g (default {cfg_g:g}). diffusers' LatentConsistencyModelPipeline has no negative prompt.")
EMBEDDING_USE = """```python
from diffusers import LatentConsistencyModelPipeline

pipe = LatentConsistencyModelPipeline.from_pretrained("<this folder>")
image = pipe("a large red circle on a blue background", num_inference_steps={steps_rec}, guidance_scale={guidance_rec}).images[0]
```

`guidance_scale` g is the usual scale; the student was conditioned on the paper's w = g - 1.
"""
CFG_NOTE = ("Real-CFG mode: the student was distilled on the teacher's UNGUIDED ODE (w = 0), with {share:.0%} of the "
            "captions replaced by the empty prompt so it also knows the unconditional branch; it has no w input. "
            "Guidance is classifier-free guidance at sampling time, two UNet passes per step, and it takes a negative "
            "prompt. Use a small guidance scale (1-3); never distil this model again with guidance.")
CFG_USE = """```python
from diffusers import LCMScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("<this folder>")  # its scheduler is an LCMScheduler
image = pipe("a star on a white background", negative_prompt="red", num_inference_steps={steps_rec},
             guidance_scale={guidance_rec}).images[0]
```

`guidance_scale` g is CFG's scale on the consistency function (f_0 + g (f_c - f_0)); g = 1 runs one pass.
"""

SCHEDULE_NOTES = {
    "grid": "diffusers' own selection from the skipping grid, Algorithm 3; `num_inference_steps` gives it",
    "refine": "after the first step every step at low noise, `latentcm.schedules.refine_timesteps`; pass those "
              "to diffusers as `timesteps`",
}


def check_schedule(schedule: str) -> str:
    """``schedule`` when it is a timestep schedule latentcm samples on (``defaults.TIMESTEP_SCHEDULES``), else
    a one-line ModelError."""
    if schedule not in TIMESTEP_SCHEDULES:
        raise ModelError(f"unknown timestep schedule {schedule!r}; choose from {', '.join(TIMESTEP_SCHEDULES)}")
    return schedule


def unguided_w0(card_info: dict) -> bool:
    """Whether an LCD run (its card_info: the LCDConfig dict as "lcd") distilled a w-input LCM from w = 0 of the
    real teacher's ODE, the unguided one: such an LCM takes a negative prompt through real CFG at w = 0
    (``SAMPLING_FILE``'s ``unguided_w0``). A guidance-distilled one-pass teacher (``guided_teacher``) is not
    unguided at w = 0, so its runs do not qualify."""
    lcd = card_info.get("lcd", {})
    return (lcd.get("guidance_mode", "embedding") == "embedding" and lcd.get("omega_min", 1) == 0
            and not card_info.get("guided_teacher"))


def write_sampling(folder: str | Path, schedule: str, guidance_mode: str = "embedding",
                   guidance: float | None = None, unguided_w0: bool = False, renoise: str = "fresh",
                   unguided: dict | None = None) -> Path:
    """An LCM folder's ``SAMPLING_FILE``: the timestep schedule latentcm samples it on by default, for a
    real-CFG LCM its guidance mode and default g, for a w-input LCM distilled from w = 0 ``unguided_w0``, and a
    re-noising other than Algorithm 3's fresh noise (read back by ``bundle.sampling_settings``)."""
    if guidance_mode not in GUIDANCE_MODES:
        raise ModelError(f"unknown guidance mode {guidance_mode!r}; choose from {', '.join(GUIDANCE_MODES)}")
    found = {"timestep_schedule": check_schedule(schedule)}
    if guidance_mode != "embedding":
        found["guidance_mode"] = guidance_mode
    if unguided_w0:
        found["unguided_w0"] = True
    if renoise not in RENOISE:
        raise ModelError(f"unknown renoise {renoise!r}; choose from {', '.join(RENOISE)}")
    if renoise != "fresh":
        found["renoise"] = renoise
    if guidance is not None:
        found["guidance"] = float(guidance)
    if unguided:  # its first_step file must be in the folder (``export.release.copy_unguided``)
        found["unguided"] = dict(unguided)
    return write_json(Path(folder) / SAMPLING_FILE, found)


def write_sampling_settings(folder: str | Path, settings: dict) -> Path:
    """``SAMPLING_FILE`` from a settings dict (``bundle.sampling_settings`` / ``Bundle.sampling_file``: schedule,
    guidance mode, default g, ``unguided_w0``): how an export carries latentcm's sampling defaults with the model."""
    return write_sampling(folder, settings["timestep_schedule"], settings["guidance_mode"], settings["guidance"],
                          settings["unguided_w0"], settings.get("renoise", "fresh"), settings.get("unguided"))


def shipped_name(path: str) -> str:
    """A model folder for a card: the shipped model's name when it is one (absolute paths of this
    machine mean nothing to a reader), else the path as given."""
    from ..registry import SHIPPED

    for name, folder in SHIPPED.items():
        if folder.is_dir() and Path(path).is_dir() and Path(path).resolve() == folder.resolve():
            return name
    return path


def _guidance_text(lcd: dict, unet: dict, guidance: float | None, w0: bool = False) -> dict:
    """The card's guidance sentence and usage snippet for its guidance mode."""
    cfg = lcd.get("guidance_mode") == "cfg"
    g = guidance if guidance is not None else CFG_LCM_GUIDANCE if cfg else LCM_GUIDANCE
    use = (CFG_USE if cfg else EMBEDDING_USE).format(steps_rec=LCM_STEPS, guidance_rec=g)
    note = (CFG_NOTE.format(share=lcd.get("empty_prompt_share", 0.0)) if cfg
            else UNGUIDED_W0_NOTE.format(dim=unet.get("time_cond_proj_dim"), cfg_g=CFG_LCM_GUIDANCE)
            if w0 else EMBEDDING_NOTE.format(dim=unet.get("time_cond_proj_dim")))
    return {"guidance_note": note, "use": use}


def _low_w_text(lcd: dict) -> str:
    """The card's note on the low-w end of the recipe: the w = 0 share, the low-w skip and the noise starts, where
    set."""
    share = lcd.get("omega_zero_share")
    text = f", and w = 0 for a share of {share:g}" if share else ""
    if lcd.get("low_w_skip"):
        text += f"; k = {lcd['low_w_skip']} for the samples with w <= {lcd['low_w_max']:g}"
    if lcd.get("noise_start_share"):
        text += f"; a share of {lcd['noise_start_share']:g} starting at the grid's top point from pure noise"
    if lcd.get("ode_start_share"):
        text += (f"; a share of {lcd['ode_start_share']:g} starting on the teacher's ODE from pure noise "
                 f"({lcd['ode_start_steps']} solver steps)")
    if lcd.get("ode_pair_share"):
        text += (f"; a share of {lcd['ode_pair_share']:g} on the teacher's ODE from pure noise with that ODE's end "
                 f"point as target ({lcd['ode_pair_steps']} solver steps"
                 + (", input always the pure noise" if lcd.get("ode_pair_starts") == "top" else "") + ")")
    return text


def write_lcm_card(folder: Path, card_info: dict, schedule: str = "grid", guidance: float | None = None,
                   renoise: str = "fresh") -> Path:
    """README.md with YAML front matter (library_name: diffusers), the command that made the model, its
    timestep schedule and (other than fresh noise) its re-noising."""
    lcd, loop = card_info.get("lcd", {}), card_info.get("loop", {})
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    n, k = sched["original_inference_steps"], skip_of(sched["num_train_timesteps"], sched["original_inference_steps"])
    teacher = shipped_name(card_info.get("teacher", "?"))
    text = LCM_CARD.format(
        title=card_info.get("title", f"Latent Consistency Model distilled from `{teacher}`"),
        intro=card_info.get("intro", "Latent Consistency Distillation (Luo et al. 2023, arXiv 2310.04378, Algorithm 1) "
                                     f"of the teacher `{teacher}`, made with latentcm."), command=card_info.get("command") or "# made through the Python API: latentcm.training.recipes.run",
        solver=lcd.get("solver", "?"), skip=k, n_grid=n, grid_first=k - 1, grid_last=n * k - 1,
        omega_min=lcd.get("omega_min", "?"), omega_max=lcd.get("omega_max", "?"), ema_decay=lcd.get("ema_decay", "?"),
        omega_zero=_low_w_text(lcd),
        guided_at=("every t (LCM Eq. 6)" if lcd.get("guidance_max_t") is None else
                   f"t_{{n+k}} <= {lcd['guidance_max_t']} only, unguided above (guidance interval)"),
        proj_inputs=("the ones smooth over the w range (`--cond-proj-inputs smooth`)"
                     if lcd.get("cond_proj_inputs") == "smooth" else "all"),
        loss=lcd.get("loss", "?") + (f" (c = {lcd['huber_c']})" if lcd.get("loss") == "huber" else ""),
        steps=card_info.get("steps", "?"), batch=lcd.get("batch_size", "?"), processes=card_info.get("processes", 1),
        lr=loop.get("lr", "?"), seed=lcd.get("seed", "?"),
        **_guidance_text(lcd, unet, guidance, unguided_w0(card_info)),
        schedule=schedule, schedule_note=SCHEDULE_NOTES[check_schedule(schedule)], sampling_file=SAMPLING_FILE,
        renoise_note=KEEP_MEANS_NOTE.format(sampling_file=SAMPLING_FILE) if renoise == "keep-means" else "")
    return write_text(folder / "README.md", text)


SAFETY_PARTS = ("safety_checker", "feature_extractor")  # Stable Diffusion 1.x's NSFW filter and its preprocessor
SAFETY_CARD = """
## Safety checker

The source model's safety checker and feature extractor (`{parts}`) are carried over unchanged: diffusers' pipeline
runs the checker on every image it returns (pass `safety_checker=None` to turn it off). latentcm's own
`lcm generate` and `lcm serve` do not run it.
"""


def _safety_parts_of(source: Path) -> tuple[dict, dict]:
    """(the source's model_index.json, its non-null safety_checker / feature_extractor entries)."""
    index_file = source / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return index, {p: index[p] for p in SAFETY_PARTS if isinstance(index.get(p), list) and index[p][0] is not None}


def carry_safety_parts(source: str | Path | None, folder: Path) -> tuple[list[str], str | None]:
    """Copy ``source``'s safety checker and feature extractor (subfolders and model_index.json entries, with its
    ``requires_safety_checker``) into the saved pipeline ``folder``.

    Returns:
        (the parts carried, one line saying what was dropped and why, or None).
    """
    if source is None:
        return [], None
    source = Path(source)
    index, listed = _safety_parts_of(source)
    if not listed:
        return [], None
    missing = [p for p in listed if not (source / p).is_dir()]
    if "safety_checker" in listed and not list((source / "safety_checker").glob("*.safetensors")):
        missing.append("safety_checker weights in safetensors")
    if missing or "feature_extractor" not in listed:
        return [], (f"warning: the source model's {' and '.join(listed)} were not carried into the LCM folder: "
                    f"{source} lacks {', '.join(missing) or 'the feature_extractor the checker needs'}")
    out_index = json.loads((folder / "model_index.json").read_text())
    for part in listed:
        shutil.copytree(source / part, folder / part, dirs_exist_ok=True)
        out_index[part] = listed[part]
    out_index["requires_safety_checker"] = index.get("requires_safety_checker", True)
    write_json(folder / "model_index.json", out_index)
    return sorted(listed), None


def _move_into(src: Path, dest: Path) -> None:
    """Move the written parts into ``dest``, replacing old ones; model_index.json last (it marks completion)."""
    (dest / "model_index.json").unlink(missing_ok=True)
    for item in sorted(src.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = dest / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    src.rmdir()


def export_lcm(student: torch.nn.Module, bundle_or_teacher_dir, dest: str | Path, card_info: dict, *,
               skip: int = SKIP, schedule: str = "grid", guidance: float | None = None,
               renoise: str = "fresh") -> Path:
    """Write a complete diffusers LatentConsistencyModelPipeline folder into ``dest``, with its ``SAMPLING_FILE``
    (a real-CFG LCM, ``card_info["lcd"]["guidance_mode"] == "cfg"``: a StableDiffusionPipeline folder with an
    LCMScheduler).

    Args:
        student: the distilled UNet (with ``time_cond_proj_dim``).
        bundle_or_teacher_dir: a ``Bundle`` or a teacher diffusers folder (for vae, text encoder, tokenizer, betas).
        dest: output folder (other files in it, such as checkpoints, are left alone).
        card_info: what the model card reports: command, teacher, steps, lcd (LCDConfig dict), loop (LoopConfig dict).
        skip: the skipping interval k of the training grid (original_inference_steps = T // k).
        schedule: the timestep schedule latentcm samples the model on by default (``defaults.TIMESTEP_SCHEDULES``;
            "grid" is diffusers' own selection).
        guidance: the default g written to ``SAMPLING_FILE`` and the card; None: the kind's default.
        renoise: the LCM sampler's default re-noising (``defaults.RENOISE``), written to ``SAMPLING_FILE`` and
            the card.

    Returns:
        ``dest``.
    """
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    check_schedule(schedule)
    bundle = bundle_or_teacher_dir if isinstance(bundle_or_teacher_dir, Bundle) else Bundle.load(bundle_or_teacher_dir)
    cfg_mode = card_info.get("lcd", {}).get("guidance_mode") == "cfg"
    if (student.config.get("time_cond_proj_dim") is None) != cfg_mode:
        raise ValueError("an LCM's UNet has a time_cond_proj_dim (w input) unless it is a real-CFG LCM, which has none")
    scheduler = LCMScheduler(**lcm_scheduler_config(bundle.scheduler_config, skip))
    if getattr(bundle, "is_sdxl", False):
        pipe = sdxl_pipeline(bundle, student, scheduler)
    elif cfg_mode:  # real CFG: diffusers' StableDiffusionPipeline runs it with an LCMScheduler (as LCM-LoRA users do)
        pipe = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=student,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = LatentConsistencyModelPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=student,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dest = Path(dest)
    tmp = dest / ".export.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    carried, dropped = carry_safety_parts(bundle.path, tmp)
    if dropped:
        logging.getLogger(__name__).warning(dropped)
    write_sampling(tmp, schedule, "cfg" if cfg_mode else "embedding", guidance,
                   unguided_w0(card_info) and not getattr(bundle, "is_sdxl", False), renoise)
    card = write_lcm_card(tmp, card_info, schedule, guidance, renoise)
    if carried or dropped:
        write_text(card, card.read_text() + (SAFETY_CARD.format(parts="`, `".join(carried)) if carried else
                                              f"\n## Safety checker\n\nThe {dropped.removeprefix('warning: the ')}.\n"))
    if getattr(bundle, "is_sdxl", False):  # diffusers has no SDXL LCM pipeline class: SDXL pipeline + LCMScheduler
        write_text(card, card.read_text().replace("LatentConsistencyModelPipeline", "StableDiffusionXLPipeline"))
    _move_into(tmp, dest)
    return dest


def sdxl_pipeline(bundle, student: torch.nn.Module, scheduler):
    """An SDXL LCM folder is diffusers' ``StableDiffusionXLPipeline`` with an ``LCMScheduler``: the pipeline
    feeds the w embedding (guidance_scale - 1) as timestep_cond and skips CFG when the UNet has time_cond_proj_dim."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2,
        tokenizer=bundle.tokenizer, tokenizer_2=bundle.tokenizer_2, unet=student, scheduler=scheduler,
        force_zeros_for_empty_prompt=bundle.force_zeros_for_empty_prompt)


TEACHER_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def export_finetuned_teacher(unet: torch.nn.Module, bundle: Bundle, dest: str | Path, info: dict) -> Path:
    """A fine-tuned teacher as a StableDiffusionPipeline folder: the new UNet, every other part copied from
    the source folder, and ``finetune.json`` (the command, data and steps that made it)."""
    dest = Path(dest)
    unet.save_pretrained(dest / "unet")
    for part in TEACHER_PARTS:
        src = Path(bundle.path) / part
        (shutil.copytree(src, dest / part, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, dest / part))
    write_json(dest / "finetune.json", info)
    return dest


GUIDED_CARD = """---
library_name: diffusers
tags: [guidance-distillation, latentcm]
---
# Guidance-distilled teacher from `{teacher}`

A diffusion model whose UNet takes the guidance scale as an input: trained with latentcm's guidance distillation
(Meng et al. 2023, "On distillation of guided diffusion models", stage 1) to reproduce its teacher's
classifier-free-guided prediction eps_c + w (eps_c - eps_0) in ONE pass, for w in [{omega_min}, {omega_max}]
(guidance scale g = 1 + w), the w embedding fed as `timestep_cond` (`time_cond_proj_dim` = {dim}) as an LCM's.

It is a stage, not an end product: `lcm distill --init-student THIS --guided-teacher THIS` continues it into an LCM
(LCD starts from it, and its one-pass guided prediction replaces the teacher's two-pass CFG in the solver step).
`lcm generate --model THIS` samples it with the teacher samplers, one UNet pass per step; it takes no negative
prompt (its unconditional branch, the empty prompt, is distilled in). How well it follows w per timestep, as it
trained: `previews/w-following.jsonl` of its run folder.

Made with {steps} steps, batch {batch}, lr {lr}, seed {seed}:

```bash
{command}
```
"""


def export_guided_teacher(unet: torch.nn.Module, bundle: Bundle, dest: str | Path, info: dict) -> Path:
    """A guidance-distilled teacher (``training.guided``) as a StableDiffusionPipeline folder: the w-conditioned
    UNet, every other part copied from the teacher folder, ``finetune.json`` and a model card."""
    dest = export_finetuned_teacher(unet, bundle, dest, {
        k: info[k] for k in ("command", "teacher", "steps", "data_report", "minutes_this_session", "lcd", "recipe")})
    lcd, loop = info.get("lcd", {}), info.get("loop", {})
    write_text(dest / "README.md", GUIDED_CARD.format(
        teacher=shipped_name(info.get("teacher", "?")), omega_min=lcd.get("omega_min"), omega_max=lcd.get("omega_max"),
        dim=unet.config.time_cond_proj_dim, steps=info.get("steps"), batch=lcd.get("batch_size"), lr=loop.get("lr"),
        seed=lcd.get("seed"), command=info.get("command") or "# Python API: recipes.run('distill-guidance')"))
    return dest
