"""``python -m normswap`` runs the command line."""

from .cli import run

run()
