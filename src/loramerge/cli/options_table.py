"""Every command's options as one Markdown table (``docs/options.md``), read from the command line itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer.main

if TYPE_CHECKING:
    import click


def command_options(app) -> dict[str, list[click.Parameter]]:
    """Each command's visible parameters, in the order ``--help`` shows them."""
    group = typer.main.get_command(app)
    return {name: [p for p in command.params if not getattr(p, "hidden", False)]
            for name, command in group.commands.items()}  # fmt: skip


def _spelling(parameter: click.Parameter) -> str:
    if parameter.param_type_name == "argument":
        return (parameter.metavar or parameter.name).upper()
    return ", ".join(f"`{opt}`" for opt in [*parameter.opts, *parameter.secondary_opts])


def _default(parameter: click.Parameter) -> str:
    default = parameter.default
    if parameter.param_type_name == "argument" or default in (None, (), []) or callable(default):
        return ""
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def options_markdown(app) -> str:
    lines = ["| command | option | default | meaning |", "|---|---|---|---|"]
    for name, parameters in command_options(app).items():
        for parameter in parameters:
            meaning = " ".join((getattr(parameter, "help", None) or "").split()).replace("|", "\\|")
            lines.append(f"| `{name}` | {_spelling(parameter)} | {_default(parameter)} | {meaning} |")
    return "\n".join(lines) + "\n"
