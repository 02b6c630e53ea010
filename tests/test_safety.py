"""Safety: pickles only with ``weights_only=True``, no remote code unless asked, no token in any output.
(Pushing with a token set is covered in test_publish.py.)"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cli_helpers import run
from conftest import CHARDEMO

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "src/loramerge").rglob("*.py"))
TOKEN = "hf_loramergeSafetyTokenThatMustNeverLeak42"


def _calls(name: str):
    """``(file, call node)`` for every call of ``<something>.name(...)`` or ``name(...)`` in the package."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def _keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_pickle_load_is_weights_only():
    loads = list(_calls("load"))
    torch_loads = [(path, node) for path, node in loads if ast.unparse(node.func) == "torch.load"]
    assert torch_loads, "the .bin readers call torch.load"
    for path, node in torch_loads:
        flag = _keyword(node, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{node.lineno}"
    for path, node in loads:
        assert ast.unparse(node.func) not in {"pickle.load", "pickle.loads", "dill.load"}, f"{path}:{node.lineno}"


def test_remote_code_is_never_trusted_in_the_package():
    for path, node in _calls("from_pretrained"):
        flag = _keyword(node, "trust_remote_code")
        assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), f"{path}:{node.lineno}"
    assert "trust_remote_code=True" not in "".join(p.read_text() for p in SOURCES)


def test_a_model_asking_for_remote_code_does_not_run_it(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(CHARDEMO / "base", model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "copy ab=", "completion": "ab"}\n')
    commands = [
        ("eval", "--base", model, "--data", data, "--prompt-field", "prompt", "--completion-field", "completion"),
        ("fold", CHARDEMO / "add", "--base", model, "-o", tmp_path / "folded"),
        ("generate", "--base", model, "--prompt", "copy ab="),
    ]
    for command in commands:  # each must run to the end (a refusal would prove nothing about remote code)
        result = run(*command)
        assert result.exit_code == 0, (command[0], result.output)
    assert not marker.exists()


def test_a_token_in_the_environment_never_reaches_output_or_files(tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    commands = [
        (0, ["merge", str(CHARDEMO / "add"), str(CHARDEMO / "sort"), "-o", str(out)]),
        (2, ["merge", "someone/private-adapter", "-o", str(tmp_path / "missing")]),  # a Hub miss: names the id
        (0, ["fold", str(out), "--base", str(CHARDEMO / "base"), "-o", str(tmp_path / "folded")]),
    ]
    for code, command in commands:
        result = subprocess.run([sys.executable, "-m", "loramerge.cli", *command], env=env, capture_output=True,
                                text=True, cwd=ROOT)  # fmt: skip
        assert result.returncode == code, (command, result.stderr)
        assert TOKEN not in result.stdout + result.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(TOKEN.encode() not in p.read_bytes() for p in files)
