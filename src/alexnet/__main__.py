"""`python -m alexnet ...` (and `torchrun -m alexnet ...`) is the `alexnet` command."""

import sys

from alexnet.commands import main

sys.exit(main())
