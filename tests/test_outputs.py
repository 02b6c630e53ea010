"""What an output folder is on disk: the modes ``cp`` would give it under the umask, a marker of what
loramerge wrote (``--force`` replaces that and nothing else), and the dtype asked for."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from cli_helpers import run
from conftest import CHARDEMO
from loramerge.io.atomic import MARKER_NAME


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder: Path) -> dict[str, str]:
    paths = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): stat.filemode(p.stat().st_mode) for p in paths}


def _dense_recipe(tmp_path: Path) -> Path:
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(CHARDEMO / "base"), "parameters": {"weight": 0.5}},
                   {"model": f"{CHARDEMO / 'base'}+{CHARDEMO / 'add'}", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }  # fmt: skip
    path = tmp_path / "dense.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_fold_and_dense_run_honour_the_umask(tmp_path, umask_022):
    outputs = {
        "merge": ["merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", tmp_path / "merge"],
        "fold": ["fold", CHARDEMO / "add", "--base", CHARDEMO / "base", "-o", tmp_path / "fold"],
        "run": ["run", _dense_recipe(tmp_path), "-o", tmp_path / "run"],
    }
    for name, argv in outputs.items():
        result = run(*argv)
        assert result.exit_code == 0, result.output
        modes = _modes(tmp_path / name)
        assert modes.pop(".") == "drwxr-xr-x", name
        assert any(path.endswith(".safetensors") for path in modes), modes
        assert set(modes.values()) == {"-rw-r--r--"}, (name, modes)


def test_a_stricter_umask_is_honoured_too(tmp_path):
    previous = os.umask(0o077)
    try:
        assert run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", tmp_path / "m").exit_code == 0
    finally:
        os.umask(previous)
    modes = _modes(tmp_path / "m")
    assert modes.pop(".") == "drwx------"
    assert set(modes.values()) == {"-rw-------"}


def test_force_replaces_what_loramerge_wrote_and_nothing_else(tmp_path):
    out = tmp_path / "merged"
    argv = ["merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", out, "--force"]
    assert run(*argv).exit_code == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["written_by"] == "loramerge"
    assert marker["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert run(*argv).exit_code == 0  # its own output: replaced
    (out / "notes.txt").write_text("mine")  # a user's file put into an output afterwards
    result = run(*argv)
    assert result.exit_code == 2
    assert "holds files loramerge did not write (notes.txt)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", empty, "--force").exit_code == 0


def test_force_replaces_an_output_written_before_the_marker(tmp_path):
    """Outputs of earlier versions carry no marker: loramerge's model card and only its file names."""
    out = tmp_path / "merged"
    assert run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", out).exit_code == 0
    (out / MARKER_NAME).unlink()
    assert run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", out, "--force").exit_code == 0
    peft_folder = tmp_path / "trained"  # a PEFT adapter someone trained: same names, not loramerge's card
    shutil.copytree(CHARDEMO / "add", peft_folder)
    (peft_folder / "README.md").write_text("# my adapter\n")
    result = run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", peft_folder, "--force")
    assert result.exit_code == 2 and "did not write" in result.stderr
    assert (peft_folder / "README.md").read_text() == "# my adapter\n"


def test_fold_into_over_an_earlier_output_is_checked_once_and_runs(tmp_path, monkeypatch):
    """``merge A B --fold-into BASE -o merged --force`` twice: the merged adapter's label is no path."""
    monkeypatch.chdir(tmp_path)
    argv = ["merge", CHARDEMO / "add", CHARDEMO / "sort", "--fold-into", CHARDEMO / "base", "-o", "merged", "--force"]
    for _ in range(2):
        result = run(*argv)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_fold_into_over_its_own_base_is_refused_before_merging(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the merge ran before the output was checked")

    monkeypatch.setattr("loramerge.adapters.merge.execute_plan", never)
    base = tmp_path / "base"
    shutil.copytree(CHARDEMO / "base", base)
    result = run("merge", CHARDEMO / "add", CHARDEMO / "sort", "--fold-into", base, "-o", base / "x")
    assert result.exit_code == 2 and f"overlaps the input {base}" in result.stderr


def test_dtype_applies_to_the_folded_model(tmp_path):
    out = tmp_path / "folded"
    result = run("merge", CHARDEMO / "add", CHARDEMO / "sort", "--fold-into", CHARDEMO / "base", "-o", out,
                 "--dtype", "bfloat16", "--method", "linear")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))  # the folded model's, not the adapter's
    assert f"folded into {CHARDEMO / 'base'}: bfloat16, {size / 1e6:.1f} MB in" in " ".join(result.stdout.split())
