"""Package an LCM folder for release: a clean diffusers pipeline folder, an optional fp16 variant and
single file, and a model card whose YAML front matter the Hugging Face Hub reads."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..bundle import SAMPLING_FILE, Bundle
from ..defaults import LCM_DEFAULTS
from ..errors import ModelError
from ..files import write_text
from ..schedules import refine_timesteps, train_timesteps
from .pipeline import carry_safety_parts, write_sampling_settings
from .single_file import NOT_IN_LAYOUT, check_layout, save_single_file

CARD_TAGS = ("latent-consistency-model", "lcm", "text-to-image")
_, RECOMMENDED_STEPS, RECOMMENDED_GUIDANCE = LCM_DEFAULTS  # 4 steps; g 8.5 (w = 7.5) unless sampling.json names one

RELEASE_CARD = """---
library_name: diffusers
base_model: {base_model}
pipeline_tag: text-to-image
tags:
{tags}
inference:
  parameters:
    num_inference_steps: {steps}
    guidance_scale: {guidance}
---

# {title}

A Latent Consistency Model (Luo et al. 2023, arXiv 2310.04378) in diffusers'
`LatentConsistencyModelPipeline` layout, derived from `{base_name}`. It samples in 1-8 steps with
one UNet pass per step and no negative prompt; {steps} steps at guidance scale {guidance} is the
recommended setting (the UNet is conditioned on the paper's w = g - 1).

## Files

{files}

## Use

```python
{imports}from diffusers import LatentConsistencyModelPipeline

pipe = LatentConsistencyModelPipeline.from_pretrained("<this folder>"{variant_kw})
image = pipe("a large red circle on a blue background", {steps_kw},
             guidance_scale={guidance}).images[0]
```

or with latentcm: `lcm generate "a large red circle on a blue background" --model <this folder>`.
{schedule_note}{source_card}"""


def yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(str(text))


def split_front_matter(card: str) -> tuple[dict[str, str], str]:
    """(top-level 'key: value' pairs of a card's YAML front matter, the body after it); ({}, card) if none."""
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    if not match:
        return {}, card
    pairs = dict(re.findall(r"^([A-Za-z_][\w-]*):[ \t]*(\S.*)$", match.group(1), flags=re.M))
    return {k: v.strip().strip("'\"") for k, v in pairs.items()}, card[match.end():]


def demote_headings(markdown: str) -> str:
    """Every Markdown heading one level deeper (outside code fences), to nest a card inside another."""
    lines, in_code = [], False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        lines.append("#" + line if not in_code and line.startswith("#") else line)
    return "\n".join(lines)


def _recommended_guidance(bundle: Bundle | None) -> float:
    """The g a release recommends (and a single file bakes in): the model's own default (its sampling.json)."""
    return RECOMMENDED_GUIDANCE if bundle is None else bundle.defaults[2]


def _files_section(name: str, fp16: bool, single_file: bool, guidance: float = RECOMMENDED_GUIDANCE) -> str:
    rows = ["- `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` (LCMScheduler): "
            "float32 weights (`*.safetensors`)."]
    if fp16:
        rows.append('- `*.fp16.safetensors`: float16 weights, loaded with `variant="fp16", torch_dtype=torch.float16`.')
    if single_file:
        rows.append(f"- `{name}.safetensors`: every float32 weight in one file in the original Stable Diffusion "
                    "checkpoint layout (`model.diffusion_model.*`, `first_stage_model.*`, "
                    "`cond_stage_model.transformer.*`). That layout has no place for the guidance embedding "
                    f"(`time_cond_proj_dim`), so guidance scale {guidance:g} is baked into the UNet. Load "
                    "it offline with this folder as the config, and sample with `guidance_scale=1.0`:\n\n"
                    "  ```python\n  from diffusers import StableDiffusionPipeline\n\n"
                    f"  pipe = StableDiffusionPipeline.from_single_file(\"<this folder>/{name}.safetensors\", "
                    "config=\"<this folder>\",\n"
                    "                                                  local_files_only=True, time_cond_proj_dim=None)\n"
                    f"  image = pipe(\"a red circle\", num_inference_steps={RECOMMENDED_STEPS}, "
                    "guidance_scale=1.0).images[0]\n  ```")
    return "\n".join(rows)


def _steps_kw(bundle: Bundle | None) -> tuple[str, str]:
    """The pipeline call's step argument and a note: ``timesteps=[...]`` for a model whose sampling.json asks for
    the refine schedule (diffusers' own selection would differ), else ``num_inference_steps``."""
    if bundle is None or bundle.timestep_schedule != "refine":
        return f"num_inference_steps={RECOMMENDED_STEPS}", ""
    big_t = train_timesteps(bundle.scheduler_config)
    ts = refine_timesteps(RECOMMENDED_STEPS, big_t, bundle.original_inference_steps).tolist()
    return (f"timesteps={ts}", f"\nThis model was measured on latentcm's `refine` timesteps (`{SAMPLING_FILE}`): after the "
            "first step, every step at low noise. diffusers picks other timesteps from `num_inference_steps`, "
            f"so pass them as `timesteps` (`latentcm.schedules.refine_timesteps(n, {big_t}, "
            f"{bundle.original_inference_steps})` gives them for n steps).\n")


def write_release_card(folder: Path, name: str, source: Path, base_model: str, fp16: bool,
                       single_file: bool, bundle: Bundle | None = None) -> Path:
    """README.md: YAML front matter (library_name, base_model, tags, pipeline_tag, recommended settings) + usage,
    followed by the source folder's own card body, if it has one. ``bundle``: the model, for its timesteps."""
    steps_kw, schedule_note = _steps_kw(bundle)
    g = _recommended_guidance(bundle)
    old = source / "README.md"
    _, old_body = split_front_matter(old.read_text()) if old.is_file() else ({}, "")
    text = RELEASE_CARD.format(
        base_model=yaml_str(base_model), base_name=base_model, tags="\n".join(f"- {t}" for t in CARD_TAGS),
        steps=RECOMMENDED_STEPS, guidance=f"{g:g}", title=f"{name}: a Latent Consistency Model",
        files=_files_section(name, fp16, single_file, g), imports="import torch\n" if fp16 else "",
        steps_kw=steps_kw, schedule_note=schedule_note,
        variant_kw=', variant="fp16", torch_dtype=torch.float16' if fp16 else "",
        source_card=f"\n## Source model card\n\n{demote_headings(old_body.strip())}\n" if old_body.strip() else "")
    return write_text(folder / "README.md", text)


def lcm_pipeline(bundle: Bundle):
    """A diffusers ``LatentConsistencyModelPipeline`` over the bundle's modules (LCMScheduler from its config)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    base = {k: v for k, v in bundle.scheduler_config.items() if not k.startswith("_")}
    return LatentConsistencyModelPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=LCMScheduler.from_config(base), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def save_fp16_variant(pipe, folder: Path) -> None:
    """Add diffusers' ``variant="fp16"`` weight files (``*.fp16.safetensors``) to a saved pipeline folder.

    Saved beside, then only the weight files are moved in: the folder's configs keep saying float32
    (transformers loads a text encoder in its config's dtype by default). Casts ``pipe`` to float16.
    """
    side = folder.parent / f"{folder.name}.fp16"
    shutil.rmtree(side, ignore_errors=True)
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(side, safe_serialization=True, variant="fp16")
    for weights in side.glob("*/*fp16*"):  # also shards and their index, for large models
        weights.replace(folder / weights.parent.name / weights.name)
    shutil.rmtree(side)


def _check_dest(source: Path, dest: Path) -> None:
    if dest.resolve() == source.resolve():
        raise ModelError(f"--out {dest} is the source folder; export into a new folder")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"--out {dest} exists and is not empty; choose a new folder")


def _megabytes(path: Path) -> str:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB"


def unguided_note(bundle: Bundle, what: str = "this export") -> str | None:
    """The line an export that leaves out the LCM's unguided sampling (SAMPLING_FILE's ``unguided``: its first-step
    LoRA) prints; None when the LCM has none."""
    if not bundle.unguided:
        return None
    return (f"note: {what} leaves out the unguided sampling of {SAMPLING_FILE} ({bundle.unguided}): where the LCM "
            "reads w = 0 it samples without it (latentcm folders and `lcm export` release folders keep it)")


def copy_unguided(bundle: Bundle, folder: Path) -> dict:
    """The LCM's SAMPLING_FILE settings with its ``unguided`` entry, whose first-step LoRA file is copied into
    ``folder`` (a latentcm-loadable export)."""
    unguided = bundle.unguided
    if unguided and unguided.get("first_step"):
        shutil.copy2(Path(bundle.path) / unguided["first_step"], folder / unguided["first_step"])
    return {**bundle.sampling_file(), "unguided": unguided}


def export_release(source: str | Path, dest: str | Path, *, fp16: bool = False, single_file: bool = False,
                   base_model: str | None = None, progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write a complete diffusers LatentConsistencyModelPipeline folder for an LCM folder ``source``.

    Args:
        source: an LCM folder (LCMScheduler + UNet with ``time_cond_proj_dim``); extra files in it
            (checkpoints, metrics) are not copied.
        dest: a new (or empty) folder; written via a temporary sibling, so it appears complete or not at all.
        fp16: also write diffusers' ``variant="fp16"`` weight files (``*.fp16.safetensors``).
        single_file: also write ``<dest name>.safetensors`` in the Stable Diffusion checkpoint layout, the
            recommended guidance baked in (``export.single_file``).
        base_model: the card's ``base_model``; default the source card's, else the source folder's name.
        progress: called with one line per step written (the CLI prints them).

    Returns:
        ``dest``.
    """
    source, dest = Path(source), Path(dest)
    bundle = Bundle.load(source)
    if not bundle.is_lcm:
        raise ModelError(f"{source} is a diffusion teacher, not an LCM; distil it first (lcm distill)")
    _check_dest(source, dest)
    if single_file:
        check_layout(bundle)
    progress(f"loaded the LCM {source}")  # after the checks: a refused export stays one line
    old = source / "README.md"
    base_model = base_model or split_front_matter(old.read_text() if old.is_file() else "")[0].get(
        "base_model") or source.resolve().name
    tmp = dest.parent / f".{dest.name}.export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = lcm_pipeline(bundle)
    progress("writing the diffusers pipeline (model_index.json and one folder per component)")
    pipe.save_pretrained(tmp, safe_serialization=True)
    carried, dropped = carry_safety_parts(source, tmp)  # the LCM folder's, from its SD-1.x teacher
    for part in sorted(p for p in tmp.iterdir() if p.is_dir()):
        progress(f"  {part.name}/ ({_megabytes(part)})" + (" carried over from the source" if part.name in carried
                                                            else ""))
    if dropped:
        progress(dropped)
    if single_file:
        progress(f"writing the single file {dest.name}.safetensors (Stable Diffusion checkpoint layout)")
        g = _recommended_guidance(bundle)
        progress(NOT_IN_LAYOUT.format(g=g))
        save_single_file(bundle, tmp / f"{dest.name}.safetensors", guidance=g)
        if (line := unguided_note(bundle, "the single file")) is not None:
            progress(line)
    if fp16:
        progress("writing the float16 variant (*.fp16.safetensors)")
        save_fp16_variant(pipe, tmp)
    progress(f"writing {SAMPLING_FILE} and the model card README.md")
    settings = copy_unguided(bundle, tmp)
    if settings["unguided"]:
        progress(f"carried the unguided sampling of {SAMPLING_FILE} ({settings['unguided']})")
    write_sampling_settings(tmp, settings)
    write_release_card(tmp, dest.name, source, base_model, fp16, single_file, bundle)
    if dest.exists():
        dest.rmdir()
    tmp.replace(dest)
    return dest
