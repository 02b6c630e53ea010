"""The documentation builds (``mkdocs build --strict``), its examples run or are checked, its commands use
options that exist, and it links only to files in the repository."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_adding_a_method_example_runs():
    blocks = python_blocks(ROOT / "docs" / "adding-a-method.md")
    assert blocks, "the page lost its example"
    for block in blocks:
        exec(compile(block, "docs/adding-a-method.md", "exec"), {"__name__": "docs_example"})


def test_readme_and_docs_link_only_inside_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page
        for target in re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", text):
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"


def test_readme_method_list_is_the_catalogue():
    from loramerge import catalogue

    page = ROOT / "docs" / "merging-adapters.md"
    row = next(line for line in page.read_text().splitlines() if line.startswith("| `--method`"))
    listed = set(re.findall(r"`(\w+)`", row)) - {"method"}
    assert listed == set(catalogue.adapter_methods())


def test_readme_dense_method_table_is_the_catalogue():
    """The dense recipes page's method table lists every method a recipe accepts."""
    from loramerge import catalogue

    page = ROOT / "docs" / "dense-recipes.md"
    rows = [line for line in page.read_text().splitlines() if line.startswith("| `") and "|" in line]
    first_cells = [line.split("|")[1] for line in rows if line.count("|") == 6]
    listed = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    assert set(catalogue.dense_methods()) <= listed


def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: every page in the nav, every link and anchor resolved, the API pages
    rendered from the docstrings."""
    pytest.importorskip("mkdocs")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                            "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("merge_adapters") > 1


def shell_commands(page: Path) -> list[str]:
    """The ``loramerge`` command lines of a page's bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("loramerge "):
                commands.append(line)
    return commands


def test_every_documented_command_uses_options_that_exist():
    """Each ``loramerge`` line of the docs names a command and only flags that command has."""
    import typer.main

    from loramerge.cli.app import app

    group = typer.main.get_command(app)
    checked = 0
    for page in PAGES:
        for line in shell_commands(page):
            words = shlex.split(line.replace("[", " ").replace("]", " "))
            command = group.commands.get(words[1]) if len(words) > 1 and not words[1].startswith("-") else group
            assert command is not None, f"{page.name}: unknown command in {line!r}"
            known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
            known |= {"--help", "--version", "--debug"}
            for word in words[2:]:
                if word.startswith("-") and not re.fullmatch(r"-[\d.]+", word):
                    flag = word.split("=")[0].split("|")[0]
                    assert flag in known, f"{page.name}: {flag} is no option of {words[1]} in {line!r}"
            checked += 1
    assert checked > 20


def test_every_python_block_of_the_docs_compiles_and_imports_what_exists():
    """Blocks that need files or models are not run here (the README's GGUF load is, in
    test_portable_base.py; adding-a-method's, above), but each must compile and import only names the
    package has."""
    import importlib

    blocks = 0
    for page in PAGES:
        for block in python_blocks(page):
            compile(block, page.name, "exec")
            for module, names in re.findall(r"^from (loramerge[\w.]*) import ([\w, ]+)$", block, flags=re.M):
                imported = importlib.import_module(module)
                for name in names.split(","):
                    assert hasattr(imported, name.strip()), f"{page.name}: {module} has no {name.strip()}"
            blocks += 1
    assert blocks > 3


def test_the_live_add_weighted_adapter_example_runs(monkeypatch):
    """The live-merge page's example, pasted as is, from the repository root."""
    import torch

    block = next(b for b in python_blocks(ROOT / "docs" / "live-eval-publish.md") if "add_weighted_adapter" in b)
    monkeypatch.chdir(ROOT)
    scope: dict[str, object] = {}
    exec(compile(block, "live-eval-publish.md", "exec"), scope)
    model = scope["model"]
    assert model.active_adapter == "merged"
    ids = scope["tokenizer"]("Date: 1985-08-05\nWritten out:", return_tensors="pt").input_ids
    with torch.no_grad():
        merged = model(ids).logits
        model.set_adapter("dates")
        alone = model(ids).logits
    assert torch.isfinite(merged).all() and not torch.allclose(merged, alone)
