"""`python -m embq ...` runs the `embq` command line (also under torchrun)."""

import sys

from embq.cli import main

sys.exit(main())
