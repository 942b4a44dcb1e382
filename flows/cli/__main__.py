"""``python -m calypso.flows.cli``: the ``calypso`` command without its console script."""

from calypso.flows.cli import command

command()
