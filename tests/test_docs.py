"""The documentation's examples run, and the README links only to files in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_adding_a_method_example_runs():
    blocks = python_blocks(ROOT / "docs" / "adding-a-method.md")
    assert blocks, "the page lost its example"
    for block in blocks:
        exec(compile(block, "docs/adding-a-method.md", "exec"), {"__name__": "docs_example"})


def test_readme_and_docs_link_only_inside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, page
        for target in re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", text):
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"


def test_readme_method_list_is_the_catalogue():
    from loramerge import catalogue

    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `--method`"))
    listed = set(re.findall(r"`(\w+)`", row)) - {"method"}
    assert listed == set(catalogue.adapter_methods())


def test_readme_dense_method_table_is_the_catalogue():
    """The README's dense method table lists every method a recipe accepts."""
    from loramerge import catalogue

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `") and "|" in line]
    first_cells = [line.split("|")[1] for line in rows if line.count("|") == 6]
    listed = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    assert set(catalogue.dense_methods()) <= listed
