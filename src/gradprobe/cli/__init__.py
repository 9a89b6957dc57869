"""The `gradprobe` command: `commands` (argument parsing and the subcommands; its
`main` is the console script `gradprobe` and `python -m gradprobe`), `_io` (reading
models, arrays and images; output checks) and `demo` (`gradprobe demo`)."""

from gradprobe.cli.commands import main

__all__ = ["main"]
