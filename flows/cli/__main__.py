"""`python -m flows.cli`: the `stemstream` command (what the nodes, the aggregator and the view run)."""

import sys

from flows.cli.app import main

if __name__ == "__main__":  # imported (a walk over the package's modules) it runs nothing
    sys.exit(main())
