"""``python -m autolabel.cli``: the same as the ``autolabel`` command."""

from autolabel.cli.app import main

main()
