"""The models shipped inside the package (the offline default), by name."""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = {"teacher": WEIGHTS / "teacher", "judge": WEIGHTS / "judge", "lcm": WEIGHTS / "lcm"}


def shipped_models() -> dict[str, str]:
    """Name -> folder of every shipped model present in this installation."""
    return {name: str(path) for name, path in SHIPPED.items() if path.is_dir()}


def resolve(model: str) -> Path:
    """A shipped model's name, or a local folder, -> a folder path."""
    if model in SHIPPED:
        if not SHIPPED[model].is_dir():
            raise FileNotFoundError(f"the shipped model '{model}' is missing from this installation")
        return SHIPPED[model]
    return Path(model)
