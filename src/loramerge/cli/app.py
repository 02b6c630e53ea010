"""``loramerge`` command line: parse, call the library, print a summary. Exit 0 ok, 2 bad input, 1 bug.

Each command lives in its own module as a plain function; this module registers them. Commands share
presentation through ``loramerge.cli.present`` and never import one another.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

import typer
from rich.markup import escape

from loramerge.cli import eval_cmd, finetune_cmd, fold_cmd, inspect_cmd, merge_cmd, moe_cmd, run_cmd, search_cmd
from loramerge.cli.fold_cmd import QUANT_TYPES
from loramerge.cli.present import console, deprecated, set_debug
from loramerge.errors import BadInput

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Merge LoRA adapters of one base model in low-rank space.",
)


def _print_version(asked: bool) -> None:
    if asked:
        from loramerge import __version__

        typer.echo(f"loramerge {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    set_debug(debug)


app.command("merge")(merge_cmd.merge)
app.command("run")(run_cmd.run)
app.command("moe")(moe_cmd.moe)
app.command("finetune")(finetune_cmd.finetune)
app.command("search")(search_cmd.search)
app.command("fold")(fold_cmd.fold_command)
app.command("extract")(fold_cmd.extract_command)
app.command("inspect")(inspect_cmd.inspect)
app.command("eval")(eval_cmd.eval_command)
app.command("generate")(eval_cmd.generate_command)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?,?$", re.IGNORECASE)


def joined_weights(argv: list[str]) -> list[str]:
    """``--weights 1, -0.5`` as the shell splits it (``1,`` then ``-0.5``, which would read as an option or an
    adapter) joined back into ``--weights 1,-0.5``: a list that ends with a comma goes on with the numbers after
    it."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        result.append(argv[index])
        if argv[index] == "--weights" and index + 1 < len(argv):
            index += 1
            result.append(argv[index])
        if result[-1].startswith("--weights=") or (len(result) > 1 and result[-2] == "--weights"):
            while result[-1].endswith(",") and index + 1 < len(argv) and _NUMBER.match(argv[index + 1]):
                index += 1
                result[-1] += argv[index]
        index += 1
    return result


def legacy_quantize(argv: list[str]) -> list[str]:
    """``fold --quantize nf4`` (before ``--quantize`` became a flag and the type ``--quant-type``'s, one
    spelling for the 4-bit type) as ``--quantize --quant-type nf4``, with a deprecation line. Where the old
    spelling meets a ``--quant-type`` of another value (the two types could differ before) it is refused."""
    if next((item for item in argv if not item.startswith("-")), None) != "fold":
        return argv
    result: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        value = item.partition("=")[2] if item.startswith("--quantize=") else None
        if item == "--quantize" and index + 1 < len(argv) and argv[index + 1] in QUANT_TYPES:
            index += 1
            value = argv[index]
        if value is not None:
            deprecated(f"--quantize {value}", f"--quantize --quant-type {value}")
            others = {argv[i + 1] for i, item in enumerate(argv[:-1]) if item == "--quant-type"}
            others |= {item.partition("=")[2] for item in argv if item.startswith("--quant-type=")}
            if others - {value}:
                raise BadInput(f"--quantize {value} and --quant-type {' '.join(sorted(others))}: one 4-bit type now "
                               "serves both; give it once, as --quant-type")  # fmt: skip
            result += ["--quantize", "--quant-type", value]
        else:
            result.append(item)
        index += 1
    return result


def main() -> None:
    # bitsandbytes warns on import that an optional CPU speed-up package is missing; it changes no result
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations, not results
    # PEFT looks for a config.json beside a GGUF base reference when saving; the vocabulary is unchanged
    warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")
    try:
        argv = legacy_quantize(joined_weights(sys.argv[1:]))
    except BadInput as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, soft_wrap=True)
        raise SystemExit(2) from None
    app(args=argv)
