"""`python -m embedkit.cli`: the console script."""

from . import entry

entry()
