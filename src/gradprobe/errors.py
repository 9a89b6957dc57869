"""The one exception type gradprobe raises for problems a user can fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GradprobeError(ValueError):
    """A request gradprobe cannot serve, with what was passed and how to fix it.

    It is a `ValueError`, so code that already catches `ValueError` keeps working.
    """

    # Raised while TensorFlow traces a function, it reaches the caller as itself
    # (autograph would otherwise re-wrap it in a StagingError).
    ag_pass_through = True


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Returns up to `n` candidates that look most like `name`, best first."""
    candidates = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not found:
        low = name.lower()
        found = [c for c in candidates if low in c.lower() or c.lower() in low][:n]
    return found


def quoted(names: Iterable[str], limit: int = 12) -> str:
    """Formats names as `'a', 'b', ...` with at most `limit` shown."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown
