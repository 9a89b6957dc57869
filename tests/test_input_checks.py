"""The bad-input catalog of every backend (tests/backends/input_check_cases.py) on
TensorFlow; tests/backends/test_common_input_checks.py runs it on JAX and PyTorch."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "backends"))

from input_check_cases import *  # noqa: E402,F403
