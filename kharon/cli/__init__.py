"""The `kharon` command line; `main` is the console-script entry point."""

from kharon.cli._main import cli, main

__all__ = ["cli", "main"]
