"""The ``lcm`` command line: a thin shell over importable functions.

``app`` holds the click group and ``main``; ``options`` what the commands share; one module per family
adds its commands: ``sampling`` (generate, compare, models), ``data`` (world export, prepare), ``training``
(distill, finetune, finetune-teacher, train-teacher), ``evaluation`` (evaluate), ``ablate`` (solver-skip, guidance), ``serve`` (serve, export).
"""
from . import ablate, data, evaluation, sampling, serve, training  # noqa: F401  (each registers its commands on ``cli``)
from .app import cli, main
from .options import UserError, default_model

__all__ = ["cli", "main", "UserError", "default_model"]
