"""Run the `kharon` command as `python -m kharon`."""

from kharon.cli import main

main()
