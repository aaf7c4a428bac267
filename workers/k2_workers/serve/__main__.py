"""`python -m k2_workers.serve` is `k2 worker serve`."""

import sys

from k2_workers.serve.cli import main

sys.exit(main(sys.argv[1:]))
