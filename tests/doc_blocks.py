"""The fenced Python blocks of the README and of docs/*.md, as runnable examples.

Shared by tests/test_docs.py (TensorFlow, the whole suite) and
tests/backends/test_docs_backend.py (JAX and PyTorch): one extraction, one runner.

The convention the documents follow:

* Every ```python block is self-contained: imports, a tiny model, its inputs. It runs
  as pasted, in a fresh namespace, in an empty working directory (files it writes go
  there). Shell commands and their output are ```bash / ```text blocks, never python.
* A block that runs on some backends only has an HTML comment line right before its
  fence, e.g. `<!-- backend: jax -->` or `<!-- backend: tensorflow, torch -->` (invisible
  on GitHub). Unmarked blocks run on every backend.

Each block's id is `<file>:<section>:<n>`: the slug of the nearest heading above it and
its position among that section's blocks (1-based), e.g. `README.md:quick-start:1`.
"""

from __future__ import annotations

import linecache
import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*backend:\s*([\w,\s]+?)\s*-->\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")


@dataclass(frozen=True)
class Block:
    id: str
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    backends: tuple[str, ...]

    def runs_on(self, backend: str) -> bool:
        return backend in self.backends


def documents() -> list[Path]:
    """README.md, then every docs/*.md (sorted)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    text = re.sub(r"`[^`]*\(.*?\)[^`]*`", lambda m: m.group(0).split("(")[0], heading)
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:40].rstrip("-") or "top"


def extract(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, with their backend marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    section, counts = "top", {}
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            heading = _HEADING.match(line)
            if heading:
                section = _slug(heading.group(1))
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: a ``` fence that is never closed")
        if fence.group(1) == "python":
            mark = _MARK.match(lines[i - 1]) if i else None
            wanted = (tuple(b.strip() for b in mark.group(1).split(",") if b.strip())
                      if mark else BACKENDS)
            unknown = set(wanted) - set(BACKENDS)
            if unknown:
                raise ValueError(f"{path.name}:{i}: unknown backend(s) {sorted(unknown)} "
                                 f"in the mark {lines[i - 1]!r}")
            counts[section] = counts.get(section, 0) + 1
            blocks.append(Block(f"{path.name}:{section}:{counts[section]}", path, i + 2,
                                "\n".join(lines[i + 1:end]) + "\n", wanted))
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in documents() for b in extract(path)]


def run(block: Block, workdir: Path) -> dict:
    """Executes one block in a fresh namespace, in `workdir`, after a Keras session
    reset (auto-generated layer names such as "dense" start from scratch, as in a new
    Python process) and with a fixed seed. Returns the block's namespace."""
    import keras
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import gradprobe as gp

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    gp.clear_cache()
    # A traceback shows the block's own lines (under a name with the block's id) and
    # a note gives the document's line that failed.
    name = f"<{block.id}>"
    linecache.cache[name] = (len(block.code), None, block.code.splitlines(True), name)
    code = compile(block.code, name, "exec")
    namespace: dict = {"__name__": "__doc_block__"}
    old = os.getcwd()
    os.chdir(workdir)
    try:
        exec(code, namespace)  # noqa: S102
    except BaseException as e:
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == name:
                line = tb.tb_lineno
            tb = tb.tb_next
        if line is not None:
            e.add_note(f"{block.path.name}, line {block.line + line - 1} (block {block.id})")
        raise
    finally:
        os.chdir(old)
        plt.close("all")
    return namespace
