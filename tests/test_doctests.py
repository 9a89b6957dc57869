"""Every docstring example (`>>>`) in src/gradprobe runs and prints what it shows
(issue 23, item 2).

Each docstring with examples is one test, run with `doctest` in an empty folder
after a Keras session reset and a fixed seed, with ELLIPSIS and NORMALIZE_WHITESPACE.
The examples are self-contained: each builds its own tiny model. The only names
provided are the imports every example assumes:

    gp     -- `import gradprobe as gp`
    keras  -- `import keras`
    np     -- `import numpy as np`

An example for some backends only says so in its heading, `Example (JAX):` or
`Example (TensorFlow, PyTorch):`; it is skipped on the others (this module runs in the
TensorFlow suite; tests/backends/test_doctests_backend.py runs the JAX and PyTorch ones).
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import keras
import numpy as np
import pytest

import gradprobe

PACKAGE = Path(gradprobe.__file__).resolve().parent
NAMES = {"tensorflow": "tensorflow", "jax": "jax", "pytorch": "torch", "torch": "torch"}
_HEADING = re.compile(r"^\s*Example \(([^)]*)\):\s*$", re.M)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Docstrings expected to fail until another change lands: name -> (reason, text that
# the failure report must contain). Remove an entry once it passes.
XFAIL: dict = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstring_tests() -> list[doctest.DocTest]:
    """The docstrings with examples of every gradprobe module that has any."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found: dict[str, doctest.DocTest] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(_module_name(path))
        for test in finder.find(module):
            if test.examples:
                found.setdefault(test.name, test)
    return sorted(found.values(), key=lambda t: t.name)


def backends_of(test: doctest.DocTest) -> tuple[str, ...]:
    heading = _HEADING.search(test.docstring or "")
    if heading is None:
        return ("tensorflow", "jax", "torch")
    return tuple(NAMES[n.strip().lower()] for n in heading.group(1).split(","))


TESTS = docstring_tests()


def params(backend: str) -> list:
    out = []
    for test in TESTS:
        wanted = backends_of(test)
        marks = [] if backend in wanted else [pytest.mark.skip(
            reason=f"an example for {', '.join(wanted)} only")]
        out.append(pytest.param(test, id=test.name.removeprefix("gradprobe."), marks=marks))
    return out


def run_docstring(test: doctest.DocTest, workdir: Path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    gradprobe.clear_cache()
    monkeypatch.chdir(workdir)
    test.globs = {"gp": gradprobe, "keras": keras, "np": np}
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        result = runner.run(test, out=report.append, clear_globs=True)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
    if result.failed:
        text = "".join(report)
        if test.name in XFAIL and XFAIL[test.name][1] in text:
            pytest.xfail(XFAIL[test.name][0])
        pytest.fail(f"{result.failed} of {result.attempted} examples failed:\n{text}",
                    pytrace=False)


def test_every_public_function_with_an_example_is_collected():
    names = {t.name for t in TESTS}
    for expected in ("gradprobe", "gradprobe.core.engine.gradients",
                     "gradprobe.attribution.saliency.saliency",
                     "gradprobe.core.targets.at", "gradprobe.report.html.write_report"):
        assert expected in names, sorted(names)
    assert set(XFAIL) <= names, sorted(set(XFAIL) - names)
    # every `>>>` line of the package (but comment lines) is in a collected example
    prompts = sum(len(re.findall(r">>> (?!#)", path.read_text(encoding="utf-8")))
                  for path in PACKAGE.rglob("*.py"))
    assert prompts == sum(len(t.examples) for t in TESTS)


def test_backend_headings_are_read():
    marked = {t.name: backends_of(t) for t in TESTS}
    assert marked["gradprobe.core._functional_form.functional"] == ("jax",)
    assert marked["gradprobe.core.tape.Tape"] == ("tensorflow", "torch")


@pytest.mark.parametrize("test", params(keras.backend.backend()))
def test_docstring_examples_run(test, tmp_path, monkeypatch):
    run_docstring(test, tmp_path, monkeypatch)
