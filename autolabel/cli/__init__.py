"""The ``autolabel`` command line: the top of the import graph.

``app`` holds the typer application; commands live in one module per kind of work
(``data_commands``, ``label_commands``, ``train_commands``, ``flow_commands``), what they print in
``console`` and ``reports``. Only ``run`` and ``demo`` import Prefect, so the others start fast.
"""

from autolabel.cli.app import app, main

__all__ = ["app", "main"]
