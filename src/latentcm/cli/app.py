"""The ``lcm`` click group and its entry point; the family modules add their commands to ``cli``.

Bad input ends with one line on stderr (``lcm: error: ...``) and exit code 2.
"""
from __future__ import annotations

import sys

import click

from .. import offline  # noqa: F401
from .options import UserError, diffusers_hint


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="latentcm")
def cli() -> None:
    """latentcm: Latent Consistency Models on Stable-Diffusion-family models, offline."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: click errors and bad input become one line and exit code 2."""
    from ..errors import ModelError, one_line

    try:
        cli.main(args=argv, prog_name="lcm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:
        stopped = exc.__cause__  # training's KeyboardInterrupt says where it stopped and how to continue
        click.echo(f"lcm: {stopped}" if isinstance(stopped, KeyboardInterrupt) and str(stopped) else "lcm: aborted",
                   err=True)
        sys.exit(130 if isinstance(stopped, KeyboardInterrupt) else 1)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # `lcm` / `lcm ablate` alone: the help
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.NoSuchOption as exc:  # a diffusers script's flag: ours, not click's nearest spelling
        click.echo(f"lcm: error: {diffusers_hint(exc) or ' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"lcm: error: {' '.join(exc.format_message().split())}", err=True)  # click's can be multi-line
        sys.exit(2 if isinstance(exc, (click.UsageError, UserError)) else exc.exit_code)
    except (ModelError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
        click.echo(f"lcm: error: {one_line(exc)}", err=True)
        sys.exit(2)
