"""``loramerge inspect``: what adapters hold, what they share, where they conflict."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from loramerge.cli.present import out, reports_errors

if TYPE_CHECKING:
    from loramerge.adapters.inspect import AdapterSummary, SetSummary

TOP_MODULES = 5


def adapter_table(summaries: list[AdapterSummary]) -> Table:
    """One column per adapter, one row per field: readable at 80 columns, long paths folded, never cut."""
    table = Table(title="adapters", show_header=len(summaries) > 1)
    table.add_column("", style="bold", no_wrap=True)
    for number in range(1, len(summaries) + 1):
        table.add_column(f"#{number}", overflow="fold")
    rows = {
        "adapter": [s.source for s in summaries],
        "type": [s.kind for s in summaries],
        "base model": [s.base_model or "-" for s in summaries],
        "modules": [str(s.modules) for s in summaries],
        "ranks": [", ".join(f"{rank}×{count}" for rank, count in s.ranks.items()) for s in summaries],
        "alpha": [", ".join(f"{a:g}" for a in s.alphas) for s in summaries],
        "scale": [", ".join(f"{x:.4g}" for x in s.scales) + (" rsLoRA" if s.use_rslora else "") for s in summaries],
        "dtype": [s.dtype for s in summaries],
        "params": [f"{s.parameters:,}" for s in summaries],
        "mean ‖Δ‖": [f"{s.norm_mean:.4g}" for s in summaries],
    }
    for field, values in rows.items():
        table.add_row(field, *values)  # the console reads no markup: values print as they are
    return table


def module_table(summary: AdapterSummary) -> Table:
    table = Table(title=f"largest deltas of {summary.source}")
    table.add_column("module", overflow="fold")
    table.add_column("‖scale·B A‖_F")
    top = sorted(summary.module_norms.items(), key=lambda item: -item[1])[:TOP_MODULES]
    for name, norm in top:
        table.add_row(name, f"{norm:.4g}")
    return table


def print_set(summaries: list[AdapterSummary], shared: SetSummary) -> None:
    out.print(f"shared modules: {len(shared.shared_modules)}")
    for source, names in shared.only_in.items():
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            out.print(f"only in {source}: {len(names)} modules ({shown})")
    for conflict in shared.conflicts:
        out.print(f"[yellow]conflict:[/] {escape(conflict)}", markup=True, soft_wrap=True)
    if shared.pairs:
        table = Table(title="pairwise agreement of deltas (cosine over shared modules)")
        for column in ("pair", "shared", "mean cosine", "opposed modules"):
            table.add_column(column, overflow="fold")
        for pair in shared.pairs:
            names = f"#{pair.first + 1} ~ #{pair.second + 1}"  # the adapters table's columns
            table.add_row(names, str(pair.shared_modules), f"{pair.cosine_mean:+.3f}", str(pair.opposed_modules))
        out.print(table)


@reports_errors
def inspect(
    adapters: list[str] = typer.Argument(..., help="PEFT adapter folders or Hub repo ids."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    modules: bool = typer.Option(False, "--modules", help=f"Show the {TOP_MODULES} largest deltas per adapter."),
) -> None:
    """Show modules, ranks, alpha and scale, dtype, base model and delta norms; for several, how they relate."""
    from loramerge.adapters.files import load_adapter
    from loramerge.adapters.inspect import summarize_adapter, summarize_set

    loaded = [load_adapter(ref, allow_nonfinite=True) for ref in adapters]  # a report shows them
    summaries = [summarize_adapter(adapter) for adapter in loaded]
    shared = summarize_set(loaded) if len(loaded) > 1 else None
    if as_json:
        payload = {
            "adapters": [dataclasses.asdict(s) for s in summaries],
            "set": dataclasses.asdict(shared) if shared else None,
        }
        out.print_json(json.dumps(payload))
        return
    out.print(adapter_table(summaries))
    if modules:
        for summary in summaries:
            out.print(module_table(summary))
    if shared:
        print_set(summaries, shared)
