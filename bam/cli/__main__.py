"""`python -m bam.cli ...`: the `bam` command without its console script."""

import sys

from bam.cli import main

sys.exit(main())
