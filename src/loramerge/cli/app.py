"""``loramerge`` command line: parse, call the library, print a summary. Exit 0 ok, 2 bad input, 1 bug."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from loramerge.errors import BadInput
from loramerge.io.publish import PushFailed

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Merge LoRA adapters of one base model in low-rank space.",
)
console = Console(stderr=True, highlight=False, markup=False)
out = Console(highlight=False, markup=False)
_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., object])


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


def reports_errors(command: F) -> F:
    """Turn library errors into one line and an exit code; ``--debug`` shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BadInput as error:
            _show_traceback()
            console.print(f"[bold red]error:[/] {escape(one_line(error))}", markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except PushFailed as error:
            console.print(f"[bold red]error:[/] {escape(one_line(error))}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as error:  # disk full, file size limit, permissions: the staging folder is already gone
            _show_traceback()
            where = f" ({error.filename})" if error.filename else ""
            reason = escape((error.strerror or one_line(error)) + where)
            console.print(f"[bold red]error:[/] {reason}; nothing was written", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]; no output was written", markup=True)
            raise typer.Exit(130) from None
        except Exception as error:
            _show_traceback()
            console.print(
                f"[bold red]unexpected error:[/] {type(error).__name__}: {escape(one_line(error))} "
                "(rerun with --debug for details)",
                markup=True,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _show_traceback() -> None:
    if _state["debug"]:
        traceback.print_exc(file=sys.stderr)


def publish(folder, repo_id: str | None, private: bool) -> None:
    """``--push-to-hub``: upload a finished output folder."""
    if repo_id:
        from loramerge.io.publish import push_folder

        with console.status(f"pushing to the Hub repo {repo_id}"):
            url = push_folder(folder, repo_id, private=private)
        out.print(f"pushed to {url}")


def main() -> None:
    # bitsandbytes warns on import that an optional CPU speed-up package is missing; it changes no result
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations, not results
    from loramerge.cli import eval_cmd, fold_cmd, inspect_cmd, merge_cmd, run_cmd  # noqa: F401  (registers them)

    app()
