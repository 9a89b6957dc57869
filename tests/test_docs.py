"""Every ```python block of README.md and docs/*.md runs as written (issue 23, item 2).

Each block runs in a fresh namespace, in an empty folder, on the current
`KERAS_BACKEND` (TensorFlow in the main suite run); blocks marked for other backends
(`<!-- backend: jax -->` before the fence) are skipped here and run by
tests/backends/test_docs_backend.py. The conventions are in tests/doc_blocks.py.
"""

from __future__ import annotations

import keras
import pytest

import doc_blocks

BLOCKS = doc_blocks.all_blocks()

# Blocks expected to fail until another change lands: block id -> (reason, the one
# exception type allowed). Remove an entry once its block passes (strict=False, so a
# pass does not fail the suite; any other exception still does).
XFAIL: dict = {}


def params(backend: str) -> list:
    out = []
    for block in BLOCKS:
        marks = []
        if not block.runs_on(backend):
            marks.append(pytest.mark.skip(reason=f"for {', '.join(block.backends)} only"))
        if block.id in XFAIL:
            reason, raises = XFAIL[block.id]
            marks.append(pytest.mark.xfail(reason=reason, raises=raises, strict=False))
        out.append(pytest.param(block, id=block.id, marks=marks))
    return out


def test_documents_have_python_blocks_and_unique_ids():
    ids = [b.id for b in BLOCKS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert any(b.id.startswith("README.md:quick-start:") for b in BLOCKS)
    assert set(XFAIL) <= set(ids), sorted(set(XFAIL) - set(ids))


def test_extraction_reads_marks_and_skips_other_fences(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n```bash\necho no\n```\n## Two `gp.f(a, b)`\n"
                   "<!-- backend: jax, torch -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n")
    a, b = doc_blocks.extract(doc)
    assert (a.id, a.backends, a.code, a.line) == ("x.md:two-gp-f:1", ("jax", "torch"),
                                                  "x = 1\n", 8)
    assert (b.id, b.backends) == ("x.md:two-gp-f:2", doc_blocks.BACKENDS)


@pytest.mark.parametrize("block", params(keras.backend.backend()))
def test_block_runs(block, tmp_path):
    doc_blocks.run(block, tmp_path)
