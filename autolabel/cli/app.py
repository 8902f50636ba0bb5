"""The typer application and the console-script entry point.

Errors of the :class:`~autolabel.errors.AutolabelError` family and invalid settings print one
clear line and exit with code 2; no traceback for bad input.
"""

from __future__ import annotations

import sys

import typer

from autolabel.errors import AutolabelError, describe_os_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Propagate sparse segmentation labels through driving video (Warp-Refine Propagation).")


def _register() -> None:
    from autolabel.cli import (
        data_commands,
        flow_commands,
        label_commands,
        review_commands,
        train_commands,
    )

    for module in (data_commands, label_commands, review_commands, train_commands, flow_commands):
        module.register(app)


def main() -> None:
    """Console-script entry point: run the app, turning autolabel errors into clean exits."""
    from pydantic import ValidationError

    from autolabel.cli.console import err_console
    from autolabel.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # before torch, zarr and OpenCV start their threads
    try:
        app()
    except AutolabelError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # disk full, file size limit, read-only or vanished storage
        err_console.print(f"[bold red]error:[/] {describe_os_error(exc)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
        err_console.print(f"[bold red]error:[/] invalid {exc.title} settings: {problems}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)


_register()
