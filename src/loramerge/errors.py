"""Errors the CLI reports as bad input (exit code 2): one line naming the file, key or module at fault."""


class BadInput(ValueError):
    """The inputs or parameters cannot be merged as asked."""
