"""How long compiled requests and results live (tests/backends/lifetime_cases.py) on JAX
and PyTorch; tests/test_lifetime.py runs the same cases on TensorFlow."""

from backend_helpers import skip_unless_jax_or_torch

skip_unless_jax_or_torch()

from lifetime_cases import *  # noqa: E402,F403
