"""Every figure of the documentation's benchmark pages is copied from a results file under benchmarks/results/.

What counts as a figure (``figures``): in the text of a checked page, every number with a unit (s, ms,
min, MiB, GiB, MB, GB, %, ×) and every number with a decimal point or an exponent; in its tables, every
number in a cell. Not figures: numbers inside code (commands and flags are inputs), link targets, numbers
glued to a word (``SmolLM2``, ``bf16``), and the phrases listed in ``NON_FIGURES`` with the reason each is
no measurement. A figure is traced when a results file (``.md``, ``.json``, ``.yml``; not the raw ``.csv``
tables, whose thousands of numbers would match anything) holds the same number rounded as the page shows
it (``0.992`` for ``0.9916…``), with the same unit or none; versions (``0.1.5``) must appear as they are.
"""

from __future__ import annotations

import re
from itertools import chain
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"

# page -> what is checked: "all" (text and tables) or "tables" (the demo tables only)
SECTIONS = {
    "quality.md": "all",
    "benchmarks.md": "all",
    "after-the-merge.md": "tables",
    "fold-extract-gguf.md": "tables",
    "diffusion-loras.md": "tables",
}

# Phrases of those pages whose numbers are no measurement, each with the reason; each must be in them.
NON_FIGURES = {
    "about 40 min on 2 CPU cores": "how long quality.py runs, to plan a run; the earlier run did not record its time",
    "ε = 0.15": "DELLA's default epsilon: a setting of the benchmark",
    "limit 60 s": "the speed requirement of the default merge, not a measurement",
    "limit 5 minutes": "the speed requirement of the full-space merge, not a measurement",
}

UNITS = {"ms": "ms", "s": "s", "min": "min", "minutes": "min", "MiB": "MiB", "GiB": "GiB", "MB": "MB",
         "GB": "GB", "%": "%", "×": "x", "x": "x"}  # fmt: skip
_NUMBER = r"\d+(?:\.\d+)*(?:e[-+]?\d+)?"
# a number (or an en-dash range of two) not glued to a word, then an optional unit: "×"/"x" glued to it
# ("2426×", not "4096×4096"), the others after at most one space
FIGURE = re.compile(
    rf"(?<![\w.])({_NUMBER})(?:\s?–\s?({_NUMBER}))?(?:([×x])(?![\w.])|\s?(ms|s|min|minutes|MiB|GiB|MB|GB|%)(?!\w))?"
)
Figure = tuple[str, str | None]  # (the number as written, its unit)


def numbers(text: str) -> list[tuple[Figure, bool]]:
    """Every number of ``text`` with its unit, and whether it is written as a figure (unit, point or exponent)."""
    found = []
    for match in FIGURE.finditer(text):
        first, second, ratio, other = match.groups()
        unit = UNITS[ratio or other] if (ratio or other) else None
        for number in (first, second):
            if number is not None:
                found.append(((number, unit), unit is not None or "." in number or "e" in number))
    return found


def without_code(text: str) -> str:
    """``text`` less fenced blocks, inline code, link targets and the listed non-figures."""
    text = re.sub(r"```.*?```", " ", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    for phrase in NON_FIGURES:
        text = text.replace(phrase, " ")
    return text


def section(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def figures() -> list[tuple[str, Figure, str]]:
    """(page, figure, the line it is on) for every figure of the checked pages."""
    found = []
    for heading, scope in SECTIONS.items():
        for line in without_code(section(heading)).splitlines():
            table = line.lstrip().startswith("|")
            if scope == "tables" and not table:
                continue
            found += [(heading, figure, line.strip()) for figure, marked in numbers(line) if table or marked]
    return found


def results_pool(folder: Path = RESULTS) -> dict[str | None, list[str]]:
    """Every number written in a results file, by unit."""
    pool: dict[str | None, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".md", ".json", ".yml") and path.is_file():
            for (number, unit), _ in numbers(path.read_text(encoding="utf-8")):
                pool.setdefault(unit, []).append(number)
    return pool


def _rounds_to(written: str, value: str) -> bool:
    """Whether ``value`` rounded to ``written``'s precision is ``written`` (versions: equal strings)."""
    if written.count(".") > 1 or value.count(".") > 1:
        return written == value
    mantissa, _, exponent = written.partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_step = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    return abs(float(value) - float(written)) <= half_step * (1 + 1e-9)


def traced(figure: Figure, pool: dict[str | None, list[str]]) -> bool:
    number, unit = figure
    candidates = pool.get(None, []) + pool.get(unit, []) if unit is not None else list(chain(*pool.values()))
    return any(_rounds_to(number, value) for value in candidates)


def test_the_pages_and_non_figures_are_in_the_docs():
    for page in SECTIONS:
        assert (DOCS / page).is_file(), f"benchmark page renamed or gone: {page}"
    checked = "".join(section(page) for page in SECTIONS)
    stale = [phrase for phrase in NON_FIGURES if phrase not in checked]
    assert not stale, f"NON_FIGURES lists phrases the pages no longer have: {stale}"


def test_every_documented_figure_is_in_a_results_file():
    pool = results_pool()
    missing = [f"{page}: {number}{' ' + unit if unit else ''} in: {line}"
               for page, (number, unit), line in figures()
               if not traced((number, unit), pool)]  # fmt: skip
    assert not missing, "figures found in no file under benchmarks/results/:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("took **3.8 s** (limit", [(("3.8", "s"), True)]),
        ("269–271 s", [(("269", "s"), True), (("271", "s"), True)]),
        ("2426× faster, 4096×4096", [(("2426", "x"), True), (("4096", None), False), (("4096", None), False)]),
        ("error 2.2e-6, SmolLM2 in bf16, 93.9 %", [(("2.2e-6", None), True), (("93.9", "%"), True)]),
        ("224 modules, 32 layers", [(("224", None), False), (("32", None), False)]),
    ],
)
def test_what_counts_as_a_figure(text, expected):
    assert numbers(text) == expected


def test_a_figure_is_traced_only_to_the_same_rounded_number_and_unit(tmp_path):
    (tmp_path / "run.md").write_text("| 3.83 s | 0.9916666 | 762 MiB | mergekit-yaml 0.1.5 | 445 |\n")
    pool = results_pool(tmp_path)
    assert all(traced(f, pool) for f in [("3.8", "s"), ("0.992", None), ("762", "MiB"), ("0.1.5", None)])
    assert all(traced(f, pool) for f in [("445", "s"), ("4", None)])  # a unitless cell traces any unit
    assert not any(traced(f, pool) for f in [("3.9", "s"), ("0.991", None), ("762", "%"), ("0.1.6", None)])
    assert not traced(("85.4", "%"), pool)
