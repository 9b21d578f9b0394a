"""The results.json schema of ``lcm evaluate`` and the ablations, and reading / writing results files.

Keys renamed since older results files were written are mapped on load (``upgrade_keys``): ``clip_score``
(the judge's agreement with the prompt, not a CLIP score) -> ``caption_score``; a number ``accuracy``
(Table 1's all-attributes-right share) and ``exact_accuracy`` -> ``exact_match``; a per-attribute dict
``accuracy`` (the presets') -> ``attribute_accuracy``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..defaults import LCM_SAMPLER, TEACHER_SAMPLERS, TIMESTEP_SCHEDULES
from ..files import write_json
from .references import REFERENCE_KINDS
from .scoring import SCORE_PROPERTIES, SCORE_REQUIRED

TABLE_SAMPLERS = (*TEACHER_SAMPLERS, LCM_SAMPLER)

FLOOR_SCHEMA = {"type": "object", "required": [*SCORE_REQUIRED, "num_samples"],
                "properties": {**SCORE_PROPERTIES, "num_samples": {"type": "integer", "minimum": 1}}}

# LCM name -> the timestep schedule its rows use when they name none (the model folder's sampling.json)
TIMESTEP_SCHEDULES_SCHEMA = {"type": "object", "additionalProperties": {"enum": list(TIMESTEP_SCHEDULES)}}

_INTERVAL = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
_VALUE_CI = {"type": "object", "required": ["value", "ci"], "properties": {"ci": _INTERVAL}}
_DIFF_CI = {"type": "object", "required": ["diff", "ci"], "properties": {"ci": _INTERVAL}}
# a row's sampling intervals (comparisons.attach): metric -> {"value", "ci"}; attribute_accuracy: attribute -> that
INTERVALS_SCHEMA = {"type": "object", "required": ["kid", "fid", "caption_score", "exact_match"],
                    "properties": {"attribute_accuracy": {"type": "object", "additionalProperties": _VALUE_CI}},
                    "additionalProperties": _VALUE_CI}
# a row's paired differences to its baseline row (named by key): metric -> {"diff", "ci"}
PAIRED_SCHEMA = {"type": "object", "required": ["baseline", "kid", "fid", "caption_score", "exact_match"],
                 "properties": {"baseline": {"type": "string"},
                                "attribute_accuracy": {"type": "object", "additionalProperties": _DIFF_CI}},
                 "additionalProperties": _DIFF_CI}

RECORD_SCHEMA = {
    "type": "object",
    "required": ["sampler", "steps", *SCORE_REQUIRED, "unet_evals", "seconds"],
    "properties": {
        "model": {"type": "string"},
        "sampler": {"enum": list(TABLE_SAMPLERS)},
        "steps": {"type": "integer", "minimum": 1},
        "guidance": {"type": "number", "minimum": 0},
        "guidance_max_t": {"type": "integer", "minimum": 0},  # present on rows guided only at t <= it
        "schedule": {"enum": list(TIMESTEP_SCHEDULES)},  # the LCM rows' timesteps, when the row names them
        **SCORE_PROPERTIES,
        "unet_evals": {"type": "number", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        "key": {"type": "string"},        # the row's key (pipeline.Row.key): what "baseline" names
        "intervals": INTERVALS_SCHEMA,    # optional, as the two below
        "paired": PAIRED_SCHEMA,
    }}

BEST_GUIDANCE_SCHEMA = {"type": "array", "items": {
    "type": "object", "required": ["key", "steps", "guidance", "baseline_guidance", "paired"],
    "properties": {"key": {"type": "string"}, "paired": PAIRED_SCHEMA}}}

RESULTS_SCHEMA = {
    "type": "object",
    "required": ["records", "num_samples", "seed", "extractor", "reference", "reference_kind", "floor"],
    "properties": {
        "num_samples": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer"},
        "extractor": {"type": "string"},
        "reference": {"type": "string"},
        "reference_kind": {"enum": list(REFERENCE_KINDS)},
        "floor": FLOOR_SCHEMA,
        "records": {"type": "array", "minItems": 1, "items": RECORD_SCHEMA},
        "ceiling": RECORD_SCHEMA,  # optional: the teacher's guided ODE, many steps from t = T - 1
        "ceilings": {"type": "array", "items": RECORD_SCHEMA},  # optional: more ODE rows (a guidance interval)
        "sweep": {"type": "array", "items": RECORD_SCHEMA},  # optional: the rows at the other guidance scales
        "timestep_schedules": TIMESTEP_SCHEDULES_SCHEMA,
        "best_guidance": BEST_GUIDANCE_SCHEMA,  # optional: each method at its best g against the baseline at its own
        "interval_settings": {"type": "object", "required": ["method", "confidence", "num_resamples"]},
    },
}

RENAMED_KEYS = {"clip_score": "caption_score", "exact_accuracy": "exact_match"}


def own_schedules(bundles: dict) -> dict[str, str]:
    """The timestep schedule each LCM in ``bundles`` samples with when a row names none (its sampling.json)."""
    return {name: b.timestep_schedule for name, b in bundles.items() if getattr(b, "is_lcm", False)}


def validate_results(results: dict, schema: dict | None = None) -> None:
    """jsonschema.ValidationError unless ``results`` has the results.json shape (``schema``: RESULTS_SCHEMA)."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA if schema is None else schema)


def upgrade_keys(value):
    """``value`` (a results dict, a record, a list of them) with the keys of older results files renamed, at
    every depth: clip_score -> caption_score, exact_accuracy and a number accuracy -> exact_match, a dict
    accuracy -> attribute_accuracy. Current keys pass unchanged."""
    if isinstance(value, list):
        return [upgrade_keys(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key == "accuracy":
            key = "attribute_accuracy" if isinstance(v, dict) else "exact_match"
        out[RENAMED_KEYS.get(key, key)] = upgrade_keys(v)
    return out


def read_results(path: str | Path) -> dict:
    """A results.json file, older key names mapped to the current ones (``upgrade_keys``)."""
    return upgrade_keys(json.loads(Path(path).read_text()))


def write_results(path: str | Path, results: dict) -> Path:
    """Write a results dict as indented JSON, atomically."""
    return write_json(path, results)


__all__ = ["RESULTS_SCHEMA", "RECORD_SCHEMA", "INTERVALS_SCHEMA", "PAIRED_SCHEMA", "BEST_GUIDANCE_SCHEMA", "FLOOR_SCHEMA", "TIMESTEP_SCHEDULES_SCHEMA", "TABLE_SAMPLERS",
           "validate_results", "own_schedules", "upgrade_keys", "read_results", "write_results"]
