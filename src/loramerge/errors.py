"""Errors the CLI reports as bad input (exit code 2): one line naming the file, key or module at fault."""


class BadInput(ValueError):
    """The inputs or parameters cannot be merged as asked. ``param`` names the parameter at fault, where one is
    (its message names it as Python spells it, `` `device='tpu'` ``, which the command line turns into its flag)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def brief(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's error message, short enough for a one-line report."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
