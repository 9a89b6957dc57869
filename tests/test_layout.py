"""The package layout rule: TensorFlow, JAX, PyTorch and Keras' private API
(`keras.src`) are imported only in `src/gradprobe/backends/`.

The rule is ruff's banned-api setting in pyproject.toml (run by `make test` and
`make lint`); these tests run ruff with that configuration on small files placed
where package modules would be, so that a change to the configuration which
stops it from failing the build is caught.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("ruff")

ROOT = Path(__file__).resolve().parents[1]

BANNED = {
    "tensorflow": "import tensorflow as tf\n\nprint(tf.constant(1.0))\n",
    "tensorflow submodule": "from tensorflow.python.ops import array_ops\n\nprint(array_ops)\n",
    "jax": "import jax\n\nprint(jax.numpy.ones(2))\n",
    "jax submodule": "from jax import numpy as jnp\n\nprint(jnp.ones(2))\n",
    "torch": "import torch\n\nprint(torch.ones(2))\n",
    "keras.src": "from keras.src.backend.common.masking import get_keras_mask\n\n"
                 "print(get_keras_mask)\n",
    "keras.src attribute": "import keras\n\nprint(keras.src.utils)\n",
}


def _ruff(project: Path, relative: str, source: str) -> subprocess.CompletedProcess:
    path = project / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251",
         "--output-format", "concise", relative],
        cwd=project, capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's ruff configuration in an empty project folder."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("relative", ["src/gradprobe/new_module.py",
                                      "src/gradprobe/core/new_module.py",
                                      "src/gradprobe/monitor/new_module.py"])
@pytest.mark.parametrize("kind", sorted(BANNED))
def test_backend_import_outside_backends_fails_the_lint(project, relative, kind):
    result = _ruff(project, relative, BANNED[kind])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TID251" in result.stdout and "is banned" in result.stdout, result.stdout


@pytest.mark.parametrize("relative, kind", [
    ("src/gradprobe/backends/tensorflow.py", "tensorflow"),
    ("src/gradprobe/backends/jax.py", "jax"),
    ("src/gradprobe/backends/torch.py", "torch"),
    ("src/gradprobe/backends/_keras_private.py", "keras.src"),
    ("tests/test_something.py", "tensorflow"),
    ("benchmarks/bench_something.py", "torch"),
])
def test_backend_import_inside_backends_tests_and_benchmarks_passes(project, relative, kind):
    result = _ruff(project, relative, BANNED[kind])
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_package_is_not_exempt_as_a_whole(project):
    # A new module under backends/ gets no blanket exemption: each backend module
    # is listed by name, so a private Keras import lands in _keras_private only.
    result = _ruff(project, "src/gradprobe/backends/helpers.py", BANNED["keras.src"])
    assert result.returncode == 1, result.stdout + result.stderr


# The package modules (outside backends/) that may still import TensorFlow. The
# list in pyproject.toml must only shrink: a module may leave it, none may join.
_STILL_IMPORTING_TENSORFLOW = {
    "src/gradprobe/hvp.py", "src/gradprobe/penalty.py", "src/gradprobe/per_example.py",
    "src/gradprobe/monitor/callback.py", "src/gradprobe/monitor/hooks.py",
    "src/gradprobe/monitor/sinks.py",
}


def test_exempt_package_modules_only_shrink():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ignores = config["tool"]["ruff"]["lint"]["per-file-ignores"]
    exempt = {path for path, rules in ignores.items()
              if "TID251" in rules and path.startswith("src/")
              and not path.startswith("src/gradprobe/backends/")}
    assert exempt <= _STILL_IMPORTING_TENSORFLOW, sorted(exempt - _STILL_IMPORTING_TENSORFLOW)
    for path in exempt:
        assert "*" not in path, path  # one module per line, no patterns
        assert (ROOT / path).is_file(), f"{path} is exempt but does not exist: remove it"
