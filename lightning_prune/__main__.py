"""``python -m lightning_prune ...`` runs the ``lightning-prune`` command line (e.g. under ``torchrun -m``)."""

from .cli import main

main()
