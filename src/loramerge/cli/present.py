"""What every command shares: the consoles, one-line errors and exit codes, progress bars, warnings,
sizes, and the tables and summaries of plans and evaluations. The library never prints; this does."""

from __future__ import annotations

import functools
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loramerge.errors import BadInput
from loramerge.io.publish import PushFailed

if TYPE_CHECKING:  # the library (and torch) load when a command runs, so --help stays instant
    from loramerge.adapters.merge import MergePlan

F = TypeVar("F", bound=Callable[..., object])


def set_debug(debug: bool) -> None:
    _state["debug"] = debug


console = Console(stderr=True, highlight=False, markup=False, emoji=False)  # paths and ids may hold ":x:"


out = Console(highlight=False, markup=False, emoji=False)


_state: dict[str, object] = {"debug": False, "written": None, "flags": {}}


def mark_written(folder: Path) -> None:
    """The command's output is in place: an error after this point must not claim nothing was written."""
    _state["written"] = folder


def _what_was_written() -> str:
    written = _state["written"]
    return f"the output {written} was written before this error" if written else "nothing was written"


def _save_traceback() -> str:
    """The current exception's traceback in a new file of the temporary folder; returns its path."""
    import tempfile

    handle, path = tempfile.mkstemp(prefix="loramerge-traceback-", suffix=".txt")
    with open(handle, "w") as file:
        traceback.print_exc(file=file)
    return path


def reports_errors(command: F) -> F:
    """Turn library errors into one line and an exit code; ``--debug`` shows the traceback."""

    flags = command_flags(command)

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        _state["written"] = None
        _state["flags"] = flags
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BadInput as error:
            _show_traceback()
            after = f" ({_what_was_written()})" if _state["written"] else ""
            console.print(f"[bold red]error:[/] {escape(one_line(error))}{after}", markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except PushFailed as error:
            console.print(f"[bold red]error:[/] {escape(one_line(error))}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as error:  # disk full, file size limit, permissions: the staging folder is already gone
            _show_traceback()
            where = f" ({error.filename})" if error.filename else ""
            reason = escape((error.strerror or one_line(error)) + where)
            console.print(f"[bold red]error:[/] {reason}; {_what_was_written()}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print(f"[bold red]interrupted[/]; {_what_was_written()}", markup=True)
            raise typer.Exit(130) from None
        except Exception as error:  # not the input's fault: a bug in loramerge or in a library it calls
            _show_traceback()
            where = escape(_save_traceback())
            console.print(
                f"[bold red]internal error (a bug; please report it):[/] {type(error).__name__}: "
                f"{escape(one_line(error))}; {_what_was_written()}; the traceback is in {where}",
                markup=True,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def one_line(error: BaseException) -> str:
    return as_flags(" ".join(str(error).split()))


_PARAMETER = re.compile(r"`(\w+)(?:=(?:'([^']*)'|([^`]*)))?`")


def command_flags(command: Callable[..., object]) -> dict[str, str]:
    """Parameter name -> the command's own flag (``learning_rate`` -> ``--lr``), from its signature."""
    import inspect

    flags = {}
    for name, parameter in inspect.signature(command).parameters.items():
        declared = [d for d in getattr(parameter.default, "param_decls", None) or () if d.startswith("--")]
        flags[name] = declared[0] if declared else _flag(name)
    return flags


def _flag(name: str) -> str:
    """The flag typer gives a parameter it declares no flag for."""
    return "--" + name.replace("_", "-")


def as_flags(text: str, flags: dict[str, str] | None = None) -> str:
    """The library names parameters as Python spells them (`` `force=True` ``, `` `space='core'` ``); the
    command line says ``--force``, ``--space core``: each name becomes the running command's flag for it
    (``flags``, default: the command ``reports_errors`` runs)."""
    known: dict[str, str] = _state["flags"] if flags is None else flags  # type: ignore[assignment]

    def flag(match: re.Match[str]) -> str:
        name, quoted, value = match.group(1), match.group(2), match.group(3)
        option = known.get(name) or _flag(name)
        given = quoted if quoted is not None else value
        return option if given in (None, "True") else f"{option} {given}"

    return _PARAMETER.sub(flag, text)


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


PROGRESS_MIN_ITEMS = 64


def plan_table(plan: MergePlan) -> Table:
    table = Table(title="merge plan", show_lines=False)
    for column in ("module", "delta shape", "input ranks", "output rank"):
        table.add_column(column)
    for module in plan.modules:
        ranks = ["-"] * len(plan.adapters)
        for index, rank in zip(module.inputs, module.input_ranks, strict=True):
            ranks[index] = str(rank)
        table.add_row(module.name, f"{module.shape[0]}x{module.shape[1]}", ",".join(ranks), str(module.output_rank))
    return table


PROGRESS_LINE_SECONDS = 10.0


class ProgressLines:
    """Progress where stderr is no terminal (a log, a pipe, a job runner): a line at most every
    ``PROGRESS_LINE_SECONDS``, so a short job prints nothing and a long one is never silent for long."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, count: int, name: str) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_LINE_SECONDS:
            self.last = now
            console.print(f"{self.label}: {done}/{count or '?'} {name} ({now - self.started:.0f} s)", soft_wrap=True)


@contextmanager
def progress_bar(total: int | None, label: str = "merging modules") -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr (for long jobs; ``None``: the length comes with the first update)
    and the callback that advances it; lines instead where stderr is no terminal (``ProgressLines``)."""
    if not console.is_interactive:  # rich would draw nothing there (and end with an empty line)
        yield ProgressLines(label)
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    columns += (TextColumn("{task.description}"),)
    hidden = total is not None and total < PROGRESS_MIN_ITEMS
    with Progress(*columns, console=console, transient=True, disable=hidden) as bar:
        task = bar.add_task("", total=total)
        yield lambda done, count, name: bar.update(task, completed=done, total=count, description=name)


# help texts of options several commands share, so that each concept reads the same everywhere
BASE_HELP = "The base model: a folder or Hub id, a .gguf file, pkg:PACKAGE/FILE.gguf, or a 4-bit checkpoint."
DEVICE_HELP = "Where to compute: cpu | cuda (cuda:1, …)."
SHARD_HELP = "Largest output shard of a full model, e.g. 5GB or 500MB (default: 5GB; a fold: the base's largest shard)."
DEFAULT_SHARD_SIZE = "5GB"
DATA_HELP = "A local JSONL, JSON, CSV, Parquet or text file (repeatable)."
PROMPT_FIELD_HELP = "The prompt column (default: prompt, where the file has prompt and completion columns)."
COMPLETION_FIELD_HELP = "The completion column (default: completion, with --prompt-field's default)."
TEXT_FIELD_HELP = "Whole texts from this column instead of prompt/completion pairs (default: text, where no pairs)."


def deprecated(old: str, new: str) -> None:
    """The one line an old spelling gets while it still works (one release)."""
    console.print(f"warning: {old} is deprecated and goes in the next release; use {new}", soft_wrap=True)


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(as_flags(warning))}", markup=True, soft_wrap=True)


def run_adapter_plan(
    plan: MergePlan,
    target: Path,
    *,
    dry_run: bool,
    force: bool,
    fold_into: str | None = None,
    shard_size: str | None = None,
    gguf=None,
    single_file=None,
) -> None:
    """Print a plan's warnings, then either the plan (dry run) or merge with a progress bar and save
    the adapter (with ``gguf``, a ``workflows.GgufOutput``, as a llama.cpp adapter file; with ``fold_into``, the
    base with the merge folded in)."""
    from loramerge.io.sizes import human_bytes
    from loramerge.workflows import merge_and_write

    print_warnings(plan.warnings)
    if dry_run:
        out.print(plan_table(plan))
        out.print(f"dry run: {plan.describe()}; would write {target}")
        return
    written = merge_and_write(plan, target, force=force, fold_into=fold_into, shard_size=shard_size, gguf=gguf,
                              single_file=single_file, phase=progress_bar)  # fmt: skip
    mark_written(target)
    seconds = written.seconds
    if written.gguf is not None:
        report = written.gguf
        if report.dropped:
            print_warnings([f"llama.cpp adapters hold linear weights only: left out {', '.join(report.dropped)}"])
        if report.widened:
            print_warnings([f"{len(report.widened)} tensors have rows q8_0 cannot hold (not a multiple of 32): "
                            f"written as f16, as llama.cpp's converter does ({report.widened[0]}, …)"])  # fmt: skip
        size = human_bytes(target.stat().st_size)
        out.print(f"merged {plan.describe_merge()}: a llama.cpp adapter of {report.modules} modules "
                  f"({gguf.gguf_type}, alpha {report.alpha:g}, {size}) in {seconds:.2f} s -> {target}")  # fmt: skip
    elif written.folded:  # the output is the full model, not the adapter the plan describes
        out.print(f"merged {plan.describe_merge()}, folded into {fold_into}: {written.dtype}, "
                  f"{human_bytes(written.size)} in {seconds:.2f} s -> {target}")  # fmt: skip
    else:
        out.print(f"merged {plan.describe()} in {seconds:.2f} s -> {target}")


def evaluation_table(results) -> Table:
    """One evaluation set: a row per model. Several: exact match per model and set, and the merge's retention."""
    if len({r.data for r in results}) > 1:
        return skills_table(results)
    table = Table(title="evaluation")
    for column in ("model", "loss", "perplexity", "exact match", "samples", "tokens"):
        table.add_column(column)
    for r in results:
        exact = "-" if r.exact_match is None else f"{100 * r.exact_match:.1f}%"
        table.add_row(r.name, f"{r.loss:.4f}", f"{r.perplexity:.3f}", exact, str(r.samples), str(r.tokens))
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def skills_table(results) -> Table:
    """Exact match (or loss, for plain texts) of every model on every evaluation set. The last column of
    the merge is its mean retention: its score on each set over the best input adapter's, averaged."""
    from loramerge.evaluate.exact_match import Role

    sets = list(dict.fromkeys(r.data for r in results))
    models = list(dict.fromkeys(r.name for r in results))
    score = {(r.name, r.data): r for r in results}
    exact = all(r.exact_match is not None for r in results)
    table = Table(title="exact match per evaluation set" if exact else "loss per evaluation set")
    table.add_column("model")
    for name in sets:
        table.add_column(name, justify="right")
    table.add_column("mean" if exact else "mean loss", justify="right")
    roles = {r.name: r.role for r in results}
    adapters = [m for m in models if roles[m] == Role.ADAPTER]
    merged = [m for m in models if roles[m] == Role.MERGED]
    if exact and adapters and merged:
        table.add_column("kept vs. adapters", justify="right")
    for model in models:
        values = [score[(model, name)].exact_match if exact else score[(model, name)].loss for name in sets]
        cells = [_percent(v) if exact else f"{v:.4f}" for v in values]
        mean = sum(values) / len(values)
        cells.append(_percent(mean) if exact else f"{mean:.4f}")
        if len(table.columns) > len(cells) + 1:
            cells.append(_percent(retention(score, model, adapters, sets)) if model in merged else "")
        table.add_row(model, *cells)
    return table


def retention(score, model: str, adapters: list[str], sets: list[str]) -> float | None:
    """Mean over sets of ``model``'s exact match divided by the best adapter's (sets no adapter solves are
    left out)."""
    from loramerge.evaluate.suite import retention as kept

    best = {name: max(score[(a, name)].exact_match for a in adapters) for name in sets}
    return kept({name: score[(model, name)].exact_match for name in sets}, best)
