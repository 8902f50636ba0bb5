"""The typer application and the console-script entry point.

Errors of the :class:`~autolabel.errors.AutolabelError` family and invalid settings print one
clear line and exit with code 2; no traceback for bad input. Ctrl-C says what was kept and how to
go on (exit 130); SIGTERM and SIGHUP do the same (exit 143, 129).

A command's module is imported when that command runs (:class:`CommandTable`): ``autolabel
info``, ``ingest``, ``verify`` or ``export`` start without torch (about 0.8 s instead of 2.5 s
on a 2-core machine); ``autolabel --help`` imports them all to list them.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from autolabel.errors import AutolabelError, describe_os_error

# each command -> the module under autolabel.cli that defines it (its ``register``), in help order;
# tests/test_cli_app.py checks that every module registers exactly the commands named here
COMMAND_MODULES: dict[str, str] = {
    **dict.fromkeys(("ingest", "info", "synth", "export", "verify"), "data_commands"),
    **dict.fromkeys(("flow", "label", "evaluate"), "label_commands"),
    **dict.fromkeys(("review", "suggest-keyframes"), "review_commands"),
    **dict.fromkeys(("train-teacher", "train-refiner", "export-teacher"), "train_commands"),
    **dict.fromkeys(("run", "demo"), "flow_commands"),
}

# what a command that writes a store leaves when Ctrl-C stops it, and how to go on
ON_INTERRUPT: dict[str, str] = {
    "ingest": "sequences ingested before are kept and the one cut short is not in the store; the same command "
              "ingests the rest",
    "synth": "drives finished before are kept and a store shows none cut short; the same command writes the rest",
    **dict.fromkeys(("flow", "label", "run"), "stages (and segments of long drives) finished before are kept, "
                                              "nothing is left half-written; the same command goes on from there"),
    **dict.fromkeys(("train-teacher", "train-refiner"), "no checkpoint was written (a file already at --out "
                                                        "is unchanged); the progress saved in --out's .train-state "
                                                        "file (every --state-every seconds) is kept and the same "
                                                        "command goes on from there"),
    "export-teacher": "no model file was written (a file already at --out is unchanged)",
    **dict.fromkeys(("export", "review", "suggest-keyframes"),
                    "every file written so far is whole (a training set's manifest and a CVAT task's zip come "
                    "last); the same command writes them all"),
}
INTERRUPTED = 130  # the exit code typer gives a KeyboardInterrupt (128 + SIGINT)
# signals that end a command as Ctrl-C does (exit 128 + the signal), with what the closing line says
STOP_SIGNALS = {signal.SIGTERM: "terminated (SIGTERM)", signal.SIGHUP: "hung up (SIGHUP)"}


def what_is_kept(argv: list[str]) -> str | None:
    """What ``autolabel ARGV`` leaves when it stops before the end (``ON_INTERRUPT``), if known."""
    command = next((a for a in argv if not a.startswith("-")), None)
    return ON_INTERRUPT.get(command or "")


def interrupted_message(argv: list[str], how: str = "interrupted (Ctrl-C)") -> str:
    """What ``autolabel ARGV`` says when Ctrl-C (or SIGTERM: ``how``) stops it; a command name it
    knows gets its own hint."""
    hint = what_is_kept(argv)
    return f"{how}{': ' + hint if hint else ''}"


def _exit_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, systemd, a container stopping) or SIGHUP (the terminal or SSH session gone)
    ends a command as Ctrl-C does: cleanup runs (unfinished versions and temporary files removed,
    leases released, `run`'s temporary Prefect server stopped) instead of the process vanishing and
    leaving the server behind."""
    raise SystemExit(128 + signum)


def module_commands(module_name: str) -> dict[str, click.Command]:
    """The click commands that ``autolabel.cli.<module_name>`` registers, by name."""
    module = importlib.import_module(f"autolabel.cli.{module_name}")
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    module.register(sub)
    commands = dict(typer.main.get_group(sub).commands)
    for command in commands.values():  # `autolabel --help` lists the first paragraph whole (wrapped, not cut)
        if command.help and not command.short_help:
            command.short_help = " ".join(command.help.strip().split("\n\n")[0].split())
    return commands


class CommandTable(MutableMapping[str, click.Command]):
    """The root group's commands by name, each module imported on first use of one of its commands.

    Its keys are known without importing anything (``COMMAND_MODULES``), so an unknown or
    misspelt command is answered (with suggestions) at once.
    """

    def __init__(self, modules: Mapping[str, str]) -> None:
        self._modules = dict(modules)
        self._built: dict[str, dict[str, click.Command]] = {}  # by module
        self._added: dict[str, click.Command] = {}  # commands set as they are

    def __getitem__(self, name: str) -> click.Command:
        if name in self._added:
            return self._added[name]
        module = self._modules[name]  # KeyError for an unknown name
        if module not in self._built:
            self._built[module] = module_commands(module)
        return self._built[module][name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._added[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._modules.pop(name, None)
        self._added.pop(name, None)

    def _names(self) -> list[str]:
        return list(dict.fromkeys([*self._modules, *self._added]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._modules or name in self._added


class LazyGroup(TyperGroup):
    """The root command group over a :class:`CommandTable`."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        table = CommandTable(COMMAND_MODULES)
        table.update(self.commands)  # any registered on the app itself
        self.commands = table


app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Propagate sparse segmentation labels through driving video (Warp-Refine Propagation).")


def _print_version(wanted: bool) -> None:
    if wanted:
        from autolabel import __version__
        from autolabel.storage.store import SCHEMA_VERSION

        typer.echo(f"autolabel {__version__} (store schema {SCHEMA_VERSION})")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the version and the store schema it writes, "
                                                     "then exit")] = False) -> None:
    """The root's own option (the commands are in ``COMMAND_MODULES``)."""


def main() -> None:
    """Console-script entry point: run the app, turning autolabel errors into clean exits."""
    from pydantic import ValidationError

    from autolabel.cli.console import err_console, styled
    from autolabel.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # before torch, zarr and OpenCV start their threads
    for sig in STOP_SIGNALS:  # Prefect's flow engine hands SIGTERM on to this handler
        if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup` keeps SIGHUP ignored
            signal.signal(sig, _exit_on_signal)
    try:
        app()
    except SystemExit as exc:
        stopped_by = {INTERRUPTED: "interrupted (Ctrl-C)"} | {128 + s: how for s, how in STOP_SIGNALS.items()}
        if exc.code in stopped_by:
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                err_console.print(interrupted_message(sys.argv[1:], stopped_by[exc.code]), style="bold yellow",
                                  highlight=False, soft_wrap=True)
        raise
    except AutolabelError as exc:
        err_console.print(styled(("error:", "bold red"), f" {exc}"), soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # disk full, file size limit, read-only or vanished storage
        kept = what_is_kept(sys.argv[1:])
        err_console.print(styled(("error:", "bold red"), f" {describe_os_error(exc)}{'. ' + kept[0].upper() + kept[1:] if kept else ''}"),
                          soft_wrap=True)
        sys.exit(1)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or exc.title}: {e['msg']}" for e in exc.errors())
        err_console.print(styled(("error:", "bold red"), f" invalid {exc.title} settings: {problems}"), soft_wrap=True)
        sys.exit(2)

