"""The models shipped inside the package (the offline default), by name."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

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


def safetensors_files(folder: Path) -> list[Path]:
    """The .safetensors weights of one model folder, sorted (shards included): latentcm never unpickles.

    Raises:
        ModelError: the folder holds none (naming a pickle weights file there, if any).
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        pickled = sorted(f for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickled:
            raise ModelError(f"{pickled[0]} is a pickle weights file; latentcm loads safetensors only "
                             "(re-save the model with safe_serialization=True)")
        raise ModelError(f"{folder} holds no .safetensors weights")
    return files
