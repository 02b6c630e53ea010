"""The typer command line (``loramerge``)."""
