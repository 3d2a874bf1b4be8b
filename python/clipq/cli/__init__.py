"""The `clipq` command line (`main`): `main.py` dispatches, `arguments.py` holds the argument types and the groups
several commands share, and each other module is one command family."""

from clipq.cli.main import main

__all__ = ["main"]
