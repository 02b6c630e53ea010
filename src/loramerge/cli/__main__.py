"""``python -m loramerge.cli`` runs the command line."""

from loramerge.cli.app import main

main()
