"""``python -m calypso.flows.cli``: the ``calypso`` command without its console script."""

import sys

from calypso.flows.cli import main

sys.exit(main())
