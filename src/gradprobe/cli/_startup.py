"""Starting the backend for a command: Keras (and TensorFlow, JAX or PyTorch) is
imported only by a command that needs it, never for `--help` or an argument error.

Unless `--debug`, TensorFlow's native log lines stay out of the output:
`TF_CPP_MIN_LOG_LEVEL` defaults to 3 (a value the user set is kept), and the
lines its libraries print while loading, before their logging is set up (which
ignore that variable), are filtered by the same level; any other output of the
import (a Python warning, an error) is passed on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# absl's format: severity letter, date, time, thread, file:line]
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_NOISE = ("WARNING: All log messages before absl::InitializeLog() is called",
          "To enable the following instructions:")

_started = False


def native_noise(line: str, level: int) -> bool:
    """Whether a line printed while loading the backend is a native log line that
    `TF_CPP_MIN_LOG_LEVEL=level` hides (fatal lines are never hidden)."""
    m = _NATIVE_LINE.match(line)
    if m:
        severity = _SEVERITY[m.group(1)]
        return severity < min(level, 3)
    return level >= 1 and line.startswith(_NOISE)


@contextlib.contextmanager
def filtered_native_logs(level: int) -> Iterator[None]:
    """Inside the block, what is written to file descriptor 2 (native code and
    Python alike) is collected; on exit, the lines that are not native noise
    (`native_noise`) are written to standard error."""
    if level <= 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not native_noise(line, level)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def start_backend(debug: bool = False) -> None:
    """Imports Keras and its backend (once), quietly unless `debug`, and refuses a
    backend the command does not run on (a `GradprobeError`)."""
    global _started
    if _started:
        return
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    with filtered_native_logs(0 if debug else level):
        import keras

        from gradprobe import backends
        from gradprobe.core import _validate

        # The first tensor starts the devices, whose native lines come now too.
        keras.ops.convert_to_tensor(0.0)
    _started = True
    # On JAX and PyTorch each command runs as far as the functions it calls do;
    # one that is not supported there yet says so (a one-line GradprobeError).
    _validate.backend_supported("The gradprobe command", backends.FUNCTIONAL)
