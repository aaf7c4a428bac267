import sys

from k2_workers.train.cli import main

sys.exit(main())
