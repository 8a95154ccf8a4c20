"""``python -m normswap`` runs the command line.

A Ctrl-C that lands while the command line itself is imported ends quietly, as one that lands later does.
"""

import sys

try:
    from .cli import run
except KeyboardInterrupt:
    print("Stopped by interrupt: nothing was written", file=sys.stderr)
    sys.exit(130)

run()
