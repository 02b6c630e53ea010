"""One spelling per concept across the commands, an options table that matches them, and old spellings that
still work with one warning line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import run
from loramerge.cli.app import app
from loramerge.cli.options_table import command_options, options_markdown
from loramerge.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent

# concept (the parameter's name in every command) -> its one spelling and default
CONCEPTS = {
    "base": ("--base", None),
    "data": ("--data", None),
    "output": ("--output", None),
    "device": ("--device", "cpu"),
    "prompt_field": ("--prompt-field", None),
    "completion_field": ("--completion-field", None),
    "text_field": ("--text-field", None),
    "out_shard_size": ("--out-shard-size", None),
    "max_samples": ("--max-samples", None),
    "load_in_4bit": ("--load-in-4bit", False),
    "seed": ("--seed", None),
    "force": ("--force", False),
    "dtype": ("--dtype", None),
    "push_to_hub": ("--push-to-hub", None),
}
RETIRED = {"dev": "search --dev (now --data)"}  # hidden aliases: never shown


def test_every_concept_has_one_spelling_across_commands():
    seen: dict[str, set[str]] = {}
    for command, parameters in command_options(app).items():
        for parameter in parameters:
            assert parameter.name not in RETIRED, (command, RETIRED[parameter.name])
            if parameter.name not in CONCEPTS:
                continue
            spelling, default = CONCEPTS[parameter.name]
            assert parameter.param_type_name == "option" and spelling in parameter.opts, (command, parameter.name)
            if parameter.name not in ("base", "seed", "dtype", "out_shard_size"):  # defaults that differ by design
                assert parameter.default in (default, [], ()), (command, parameter.name, parameter.default)
            seen.setdefault(parameter.name, set()).add(command)
    fields = [seen.get(name, set()) for name in ("prompt_field", "completion_field", "text_field")]
    assert fields[0] == fields[1] == {"eval", "search", "finetune"}
    assert fields[2] == {"eval", "search"}  # finetune trains on pairs only
    assert {"merge", "fold", "extract", "eval", "generate", "search", "finetune"} <= seen["base"]


def test_the_options_table_is_current():
    table = (ROOT / "docs" / "options.md").read_text()
    assert table.endswith(options_markdown(app)), "regenerate docs/options.md (see its header)"


def test_old_spellings_still_work_with_one_warning_line(tmp_path):
    result = run("search", ROOT / "recipes" / "skills.yml", "--dev", tmp_path / "none.jsonl", "-o", tmp_path / "o")
    lines = result.stderr.splitlines()
    assert lines[0] == "warning: --dev is deprecated and goes in the next release; use --data", result.stderr
    assert result.exit_code == 2 and "none.jsonl" in lines[-1] and "no such file" in lines[-1]
    result = run("generate", tmp_path / "missing-model", "--prompt", "hi")
    assert result.stderr.splitlines()[0] == (
        f"warning: the base as the first argument is deprecated and goes in the next release; use --base "
        f"{tmp_path / 'missing-model'}"
    )
    assert result.exit_code == 2
    both = run("generate", "a", "--base", "b", "--prompt", "hi")
    assert both.exit_code == 2 and "give the base once" in both.stderr
    neither = run("generate", "--prompt", "hi")
    assert neither.exit_code == 2 and "give the base model: --base MODEL" in neither.stderr


def test_library_errors_name_parameters_and_each_command_shows_its_own_flag():
    """The library names a parameter as Python does (`` `learning_rate=0` ``); each command turns every one of
    its parameters into the flag it really has (``--lr``, not an invented ``--learning-rate``)."""
    import typer.main

    from loramerge.cli.present import as_flags, command_flags

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        flags = command_flags(command.callback.__wrapped__)
        for parameter in command.params:
            if parameter.param_type_name != "option":
                continue
            shown = as_flags(f"`{parameter.name}='x'`: bad", flags)
            assert shown.split()[0] in parameter.opts, (name, parameter.name, shown)


def test_the_library_names_no_command_line_flag():
    """Messages outside the command line name parameters, never ``--flags`` (the CLI maps them): every string
    inside a ``BadInput(...)`` call of the library, implicit concatenations and f-strings included."""
    import ast
    import re

    flag = re.compile(r"(?<![\w`-])--[a-z]")
    offenders = []
    for path in (ROOT / "src" / "loramerge").rglob("*.py"):
        if "cli" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BadInput":
                texts = [n.value for arg in node.args for n in ast.walk(arg)
                         if isinstance(n, ast.Constant) and isinstance(n.value, str)]  # fmt: skip
                offenders += [f"{path.name}:{node.lineno}: {text}" for text in texts if flag.search(text)]
    assert not offenders, offenders


def test_fold_quantize_with_a_type_still_works_with_one_warning_line(capsys):
    """The 4-bit type has one spelling, ``--quant-type`` (``--quantize`` is now a flag); ``fold --quantize
    nf4`` is rewritten for one release, before typer sees it."""
    from loramerge.cli.app import legacy_quantize

    rewritten = legacy_quantize(["fold", "a", "--quantize", "fp4", "--base", "b"])
    assert rewritten == ["fold", "a", "--quantize", "--quant-type", "fp4", "--base", "b"]
    assert capsys.readouterr().err.strip() == (
        "warning: --quantize fp4 is deprecated and goes in the next release; use --quantize --quant-type fp4"
    )
    assert legacy_quantize(["fold", "--quantize=nf4", "a"]) == ["fold", "--quantize", "--quant-type", "nf4", "a"]
    debug = ["--debug", "fold", "--quantize", "fp4"]
    assert legacy_quantize(debug) == ["--debug", "fold", "--quantize", "--quant-type", "fp4"]
    assert legacy_quantize(["fold", "--quantize", "nf4", "--quant-type", "nf4"])[-2:] == ["--quant-type", "nf4"]
    with pytest.raises(BadInput, match="--quantize nf4 and --quant-type fp4: one 4-bit type now serves both"):
        legacy_quantize(["fold", "a", "--quantize", "nf4", "--from-dequantized", "--quant-type", "fp4"])
    assert len(capsys.readouterr().err.strip().splitlines()) == 4  # one warning line for each old spelling
    untouched = (["fold", "--quantize", "adapter"], ["merge", "--quantize", "nf4"], ["fold", "--quant-type", "nf4"])
    assert all(legacy_quantize(argv) == argv for argv in untouched)
    assert capsys.readouterr().err == ""
