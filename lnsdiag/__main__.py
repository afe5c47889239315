"""``python -m lnsdiag`` runs the command line."""

from .cli import main

main()
