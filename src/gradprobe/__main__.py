"""`python -m gradprobe` runs the `gradprobe` command."""

import sys

from gradprobe.cli import main

sys.exit(main())
