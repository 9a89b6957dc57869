"""The bad-input catalog (tests/backends/input_check_cases.py) on JAX and PyTorch;
tests/test_input_checks.py runs the same cases on TensorFlow."""

from backend_helpers import skip_unless_jax_or_torch

skip_unless_jax_or_torch()

from input_check_cases import *  # noqa: E402,F403
