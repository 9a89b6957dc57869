"""How long compiled requests and results live (tests/backends/lifetime_cases.py), on
TensorFlow; tests/backends/test_common_lifetime.py runs the same cases on JAX and PyTorch."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "backends"))

from lifetime_cases import *  # noqa: E402,F403
