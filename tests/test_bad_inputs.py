"""The bad-input catalogue: every case is refused with exit code 2 and one line naming the file, key or
module at fault, no traceback, no output folder (nor staging leftovers), and inputs byte-identical.

Each case builds its broken input inside its own test folder from the character demo's fixtures (or, for
GGUF files, from ``gguf_helpers``), then runs one command (``merge``, ``run``, ``fold``, ``extract``,
``eval``, ``search``, ``finetune``) in-process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter
from dense_helpers import save_llama
from gguf_helpers import tiny_llama, write_gguf

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chardemo"


@dataclass
class Workspace:
    root: Path
    base: Path
    a: Path  # rank 8
    b: Path  # rank 4
    data: Path
    out: Path

    def broken(self, name: str = "broken", source: Path | None = None) -> Path:
        """A copy of adapter ``a`` (or ``source``) to break."""
        target = self.root / name
        shutil.copytree(source or self.a, target)
        return target


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.setenv("LORAMERGE_CACHE", str(tmp_path / "cache"))  # converted GGUF models; must stay empty
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("base", "reverse", "cipher"):
        shutil.copytree(FIXTURES / name, inputs / name)
    for folder in ("reverse", "cipher"):  # point the copies at the copied base
        config = json.loads((inputs / folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(inputs / "base")
        (inputs / folder / "adapter_config.json").write_text(json.dumps(config))
    data = inputs / "data.jsonl"
    data.write_text('{"prompt": "reverse abc=", "completion": "cba", "text": "reverse abc=cba"}\n')
    return Workspace(inputs, inputs / "base", inputs / "reverse", inputs / "cipher", data, tmp_path / "out")


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None], file="adapter_model.safetensors"):
    state = load_file(folder / file)
    edit(state)
    save_file(state, folder / file)
    return folder


def _poison(value: float):
    def edit(state):
        key = sorted(state)[3]
        state[key][0, 0] = value

    return edit


def _delete(name: str) -> Callable[[Path], Path]:
    return lambda folder: (folder / name).unlink() or folder


def _overwrite(name: str, data: bytes) -> Callable[[Path], Path]:
    return lambda folder: (folder / name).write_bytes(data) and folder


def _truncate(name: str) -> Callable[[Path], Path]:
    return lambda folder: _overwrite(name, (folder / name).read_bytes()[: (folder / name).stat().st_size // 2])(folder)


def _merge_broken(edit: Callable[[Path], Path]) -> Callable[[Workspace], list]:
    """``merge`` of adapter ``a`` with a copy of it broken by ``edit``."""
    return lambda w: ["merge", w.a, edit(w.broken()), "-o", w.out]


def _file(w: Workspace, name: str, text: str) -> Path:
    (w.root / name).write_text(text)
    return w.root / name


class _NotATensor:
    pass


def _bin(folder: Path, payload: object) -> Path:
    (folder / "adapter_model.safetensors").unlink()
    torch.save(payload, folder / "adapter_model.bin")
    return folder


def _other_architecture(ws: Workspace) -> Path:
    base = save_llama(ws.root / "other_base", 0, hidden=64)
    return build_adapter(base, ws.root / "other", seed=3, r=8, lora_alpha=16)


def _recipe(ws: Workspace, recipe: object, name: str = "recipe.yml") -> Path:
    path = ws.root / name
    path.write_text(yaml.safe_dump(recipe) if not isinstance(recipe, str) else recipe)
    return path


def _dense(ws: Workspace, density: float = 0.5, **changes) -> Path:
    recipe = {"merge_method": "ties", "base_model": str(ws.base),
              "models": [{"model": f"{ws.base}+{ws.a}", "parameters": {"weight": 1.0, "density": density}},
                         {"model": f"{ws.base}+{ws.b}", "parameters": {"weight": 1.0, "density": 0.5}}]}  # fmt: skip
    recipe.update(changes)
    return _recipe(ws, recipe)


def _slices(ws: Workspace, layer_range) -> Path:
    return _recipe(ws, {"merge_method": "passthrough",
                        "slices": [{"sources": [{"model": str(ws.base), "layer_range": layer_range}]}]})  # fmt: skip


def _adapter_recipe(ws: Workspace, **parameters) -> Path:
    return _recipe(ws, {"merge_method": "ties", "adapters": [{"adapter": str(ws.a)}, {"adapter": str(ws.b)}],
                        "parameters": parameters})  # fmt: skip


def _nan_model(ws: Workspace) -> Path:
    model = ws.root / "nan_model"
    shutil.copytree(ws.base, model)
    _edit_tensors(model, lambda s: s["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")),
                  "model.safetensors")  # fmt: skip
    return _recipe(
        ws,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(ws.base), "parameters": {"weight": 1}},
                {"model": str(model), "parameters": {"weight": 1}},
            ],
        },
    )


def _gguf(ws: Workspace, name: str, cut: bool = False, **broken) -> Path:
    """A tiny llama GGUF file (``broken``: ``write_gguf``'s architecture or skipped tensors); with ``cut``,
    its first half only."""
    path = write_gguf(tiny_llama(), ws.root / name, **broken)
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _existing_output(ws: Workspace) -> list:
    ws.out.mkdir()
    return _merge(ws)


def _merge(ws: Workspace, *extra) -> list:
    return ["merge", ws.a, ws.b, *extra, "-o", ws.out]


# name -> (argv built from the workspace, text the one line must contain)
CASES: dict[str, tuple[Callable[[Workspace], list], str]] = {
    # merge: unreadable or wrong adapters
    "merge: missing folder": (lambda w: ["merge", w.root / "nope", w.b, "-o", w.out], "no such folder"),
    "merge: Hub id not available offline": (
        lambda w: ["merge", "someone/not-here", w.b, "-o", w.out],  # HF_HUB_OFFLINE=1 in the tests
        "not fetched from the Hub",
    ),
    "merge: missing config": (_merge_broken(_delete("adapter_config.json")), "missing adapter_config.json"),
    "merge: config not JSON": (_merge_broken(_overwrite("adapter_config.json", b"{r: 8")), "not valid JSON"),
    "merge: config is a list": (_merge_broken(_overwrite("adapter_config.json", b"[1, 2]")), "a JSON object"),
    "merge: r is a string": (lambda w: ["merge", w.a, _edit_config(w.broken(), r="8"), "-o", w.out], "'r'"),
    "merge: lora_alpha is a list": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), lora_alpha=[16]), "-o", w.out],
        "lora_alpha",
    ),
    "merge: not a LoRA adapter": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), peft_type="IA3"), "-o", w.out],
        "peft_type is 'IA3'",
    ),
    "merge: DoRA adapter": (lambda w: ["merge", w.a, _edit_config(w.broken(), use_dora=True), "-o", w.out], "use_dora"),
    "merge: rank disagrees with config": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), r=5), "-o", w.out],
        "the config gives r=5",
    ),
    "merge: missing weights": (
        _merge_broken(_delete("adapter_model.safetensors")),
        "missing adapter_model.safetensors",
    ),
    "merge: truncated safetensors": (_merge_broken(_truncate("adapter_model.safetensors")), "cannot read"),
    "merge: corrupt safetensors header": (
        _merge_broken(_overwrite("adapter_model.safetensors", b"\x10" + b"\x00" * 7 + b"{garbage}")),
        "adapter_model.safetensors",
    ),
    "merge: .bin holding objects": (
        lambda w: ["merge", w.a, _bin(w.broken(), {"x": _NotATensor()}), "-o", w.out],
        "plain state dict",
    ),
    "merge: .bin holding a list": (
        lambda w: ["merge", w.a, _bin(w.broken(), [torch.zeros(2)]), "-o", w.out],
        "adapter_model.bin",
    ),
    "merge: unexpected tensor": (
        _merge_broken(lambda f: _edit_tensors(f, lambda state: state.update({"extra.weight": torch.zeros(2)}))),
        "unexpected tensor 'extra.weight'",
    ),
    "merge: different architecture": (lambda w: ["merge", w.a, _other_architecture(w), "-o", w.out], "delta shape"),
    "merge: NaN in an adapter": (
        lambda w: ["merge", w.a, _edit_tensors(w.broken(), _poison(float("nan"))), "-o", w.out],
        "NaN or Inf",
    ),
    "merge: Inf in an adapter": (
        lambda w: ["merge", w.a, _edit_tensors(w.broken(), _poison(float("inf"))), "-o", w.out],
        "NaN or Inf",
    ),
    # merge: impossible parameters
    "merge: too few weights": (lambda w: _merge(w, "--weights", "1"), "got 1 weights for 2 adapters"),
    "merge: weights not numbers": (lambda w: _merge(w, "--weights", "1,x"), "--weights"),
    "merge: infinite weight": (lambda w: _merge(w, "--weights", "1,inf"), "finite"),
    "merge: all weights zero": (lambda w: _merge(w, "--weights", "0,0"), "all zero"),
    "merge: density zero": (lambda w: _merge(w, "--method", "ties", "--density", "0"), "density"),
    "merge: density above one": (lambda w: _merge(w, "--method", "ties", "--density", "1.5"), "density"),
    "merge: della's density + epsilon reaches one": (
        lambda w: _merge(w, "--method", "della", "--density", "0.9"),
        "della needs",
    ),
    "merge: negative density": (lambda w: _merge(w, "--method", "dare_ties", "--density", "-0.2"), "density"),
    "merge: rank zero": (lambda w: _merge(w, "--rank", "0"), "rank"),
    "merge: rank larger than possible": (lambda w: _merge(w, "--rank", "100000"), "--rank 100000"),
    "merge: unknown method": (lambda w: _merge(w, "--method", "average"), "unknown method 'average'"),
    "merge: unknown space": (lambda w: _merge(w, "--method", "ties", "--space", "diagonal"), "space"),
    "merge: factors with unequal ranks": (
        lambda w: _merge(w, "--method", "ties", "--space", "factors"),
        "needs equal ranks",
    ),
    "merge: unknown dtype": (lambda w: _merge(w, "--dtype", "int8"), "dtype"),
    "merge: a method parameter out of range": (
        lambda w: _merge(w, "--method", "robustmerge", "--param", "floor=3"),
        "parameter floor=3.0 must be a number in [0, 1]",
    ),
    "merge: knots with a whole-matrix inner method": (
        lambda w: _merge(w, "--method", "knots", "--param", "inner=iso_c"),
        "parameter inner='iso_c' must be an element-wise adapter method",
    ),
    # merge: where the output goes
    "merge: output is an input": (lambda w: ["merge", w.a, w.b, "-o", w.a, "--force"], "overlaps the input"),
    "merge: output inside an input": (lambda w: ["merge", w.a, w.b, "-o", w.a / "merged"], "overlaps the input"),
    "merge: output exists": (_existing_output, "pass --force"),
    "merge: output is a file": (lambda w: ["merge", w.a, w.b, "-o", _file(w, "file", "x"), "--force"], "not a folder"),
    # run: recipes
    "run: missing recipe": (lambda w: ["run", w.root / "none.yml", "-o", w.out], "cannot read"),
    "run: malformed YAML": (lambda w: ["run", _recipe(w, "merge_method: [ties\n"), "-o", w.out], "malformed YAML"),
    "run: recipe is a list": (lambda w: ["run", _recipe(w, "- ties\n"), "-o", w.out], "a YAML mapping"),
    "run: unknown key": (lambda w: ["run", _dense(w, merge_methd="ties"), "-o", w.out], "merge_methd: unknown key"),
    "run: unknown method": (lambda w: ["run", _dense(w, merge_method="average"), "-o", w.out], "average"),
    "run: missing model": (
        lambda w: ["run", _dense(w, base_model=str(w.root / "nope")), "-o", w.out],
        "base_model",
    ),
    "run: density out of range": (
        lambda w: ["run", _dense(w, density=2.0), "-o", w.out],
        "density",
    ),
    "run: layer_range past the model": (lambda w: ["run", _slices(w, [0, 9]), "-o", w.out], "layer_range"),
    "run: layer_range reversed": (lambda w: ["run", _slices(w, [3, 1]), "-o", w.out], "layer_range"),
    "run: absurd layer_range": (lambda w: ["run", _slices(w, [0, 10**9]), "-o", w.out], "layer_range"),
    "run: NaN in a model": (lambda w: ["run", _nan_model(w), "-o", w.out], "NaN or Inf"),
    "run: model weights all zero": (
        lambda w: [
            "run",
            _recipe(
                w,
                {
                    "merge_method": "linear",
                    "models": [
                        {"model": str(w.base), "parameters": {"weight": 0}},
                        {"model": f"{w.base}+{w.a}", "parameters": {"weight": 0}},
                    ],
                },
            ),
            "-o",
            w.out,
        ],
        "weights are all zero",
    ),
    "run: normalized weights summing to zero": (
        lambda w: [
            "run",
            _recipe(
                w,
                {
                    "merge_method": "linear",
                    "parameters": {"normalize": True},
                    "models": [
                        {"model": str(w.base), "parameters": {"weight": 1}},
                        {"model": f"{w.base}+{w.a}", "parameters": {"weight": -1}},
                    ],
                },
            ),
            "-o",
            w.out,
        ],
        "sum to zero",
    ),
    "run: adapter recipe with unknown parameter": (
        lambda w: ["run", _adapter_recipe(w, lambda_=0.3), "-o", w.out],
        "parameters.lambda_",
    ),
    "run: adapter recipe with all weights zero": (
        lambda w: [
            "run",
            _recipe(
                w,
                {
                    "merge_method": "linear",
                    "adapters": [{"adapter": str(w.a), "weight": 0}, {"adapter": str(w.b), "weight": 0}],
                },
            ),
            "-o",
            w.out,
        ],
        "all zero",
    ),
    "run: output is the base model": (lambda w: ["run", _dense(w), "-o", w.base, "--force"], "overlaps the input"),
    "run: output inside the base model": (lambda w: ["run", _dense(w), "-o", w.base / "out"], "overlaps the input"),
    # fold
    "fold: adapter of another architecture": (
        lambda w: ["fold", _other_architecture(w), "--base", w.base, "-o", w.out],
        "the adapter needs a (64, 128) weight",
    ),
    "fold: missing base": (lambda w: ["fold", w.a, "--base", w.root / "nope", "-o", w.out], "nope"),
    "fold: NaN in the adapter": (
        lambda w: ["fold", _edit_tensors(w.broken(), _poison(float("nan"))), "--base", w.base, "-o", w.out],
        "NaN or Inf",
    ),
    "fold: unknown dtype": (lambda w: ["fold", w.a, "--base", w.base, "-o", w.out, "--dtype", "fp8"], "dtype"),
    "fold: unknown 4-bit type": (lambda w: ["fold", w.a, "--base", w.base, "-o", w.out, "--quantize", "int3"], "int3"),
    "fold: output is the base": (lambda w: ["fold", w.a, "--base", w.base, "-o", w.base, "--force"], "overlaps"),
    # extract
    "extract: missing model": (
        lambda w: ["extract", w.root / "nope", "--base", w.base, "-o", w.out, "--rank", "4"],
        "nope",
    ),
    "extract: shapes differ": (
        lambda w: ["extract", save_llama(w.root / "small", 1, hidden=64), "--base", w.base, "-o", w.out, "--rank", "4"],
        "shape",
    ),
    "extract: rank zero": (lambda w: ["extract", w.base, "--base", w.base, "-o", w.out, "--rank", "0"], "rank"),
    "extract: output is the model": (
        lambda w: ["extract", w.base, "--base", w.base, "-o", w.base, "--force", "--rank", "4"],
        "overlaps",
    ),
    # eval
    "eval: missing data": (lambda w: ["eval", w.base, "--data", w.root / "none.jsonl"], "no such file"),
    "eval: unknown data format": (lambda w: ["eval", w.base, "--data", _file(w, "data.xml", "x")], "unknown format"),
    "eval: unknown field": (
        lambda w: ["eval", w.base, "--data", w.data, "--prompt-field", "question", "--completion-field", "completion"],
        "no field 'question'",
    ),
    "eval: prompt field alone": (lambda w: ["eval", w.base, "--data", w.data, "--prompt-field", "prompt"], "give both"),
    "eval: corrupt JSONL": (lambda w: ["eval", w.base, "--data", _file(w, "bad.jsonl", '{"text": ')], "bad.jsonl"),
    "eval: base without tokenizer": (
        lambda w: ["eval", save_llama(w.root / "no_tokenizer", 2), "--data", w.data],
        "no_tokenizer",
    ),
    "eval: adapter for another base": (
        lambda w: ["eval", w.base, "--adapter", _other_architecture(w), "--data", w.data],
        "cannot load it",
    ),
    # GGUF models (read through transformers, cached as safetensors): refused before anything is cached
    "fold: truncated GGUF base": (
        lambda w: ["fold", w.a, "--base", _gguf(w, "cut.gguf", cut=True), "-o", w.out],
        "cut.gguf: truncated or corrupt GGUF file",
    ),
    "eval: .gguf file that is not GGUF": (
        lambda w: ["eval", _file(w, "fake.gguf", "not a model"), "--data", w.data],
        "fake.gguf: not a GGUF file",
    ),
    "run: GGUF base of an architecture transformers cannot load": (
        lambda w: ["run", _dense(w, base_model=str(_gguf(w, "odd.gguf", architecture="tinyarch"))), "-o", w.out],
        "odd.gguf: cannot read this GGUF file (GGUF model with architecture tinyarch is not supported",
    ),
    "fold: GGUF base missing a tensor": (
        lambda w: ["fold", w.a, "--base", _gguf(w, "holed.gguf", skip=("blk.1.ffn_down.weight",)), "-o", w.out],
        "holed.gguf: the GGUF file has no tensor for model.layers.1.mlp.down_proj.weight",
    ),
    "extract: missing GGUF base": (
        lambda w: ["extract", w.base, "--base", w.root / "none.gguf", "-o", w.out, "--rank", "4"],
        "none.gguf: no such GGUF file",
    ),
    "eval: GGUF in a package that is not installed": (
        lambda w: ["eval", "pkg:not_installed_models/model.gguf", "--data", w.data],
        "pkg:not_installed_models/model.gguf: Python package 'not_installed_models' is not installed",
    ),
    # search
    "search: a parameter the method lacks": (
        lambda w: _search(w, "--tune", "gamma=0:1"),
        "method ties has no numeric parameter 'gamma'",
    ),
    "search: a density bound above 1": (lambda w: _search(w, "--tune", "density=0.5:1.5"), "a bound is out of range"),
    "search: bounds the wrong way round": (lambda w: _search(w, "--weight-range", "2:0"), "LOW must be below HIGH"),
    "search: output is an input adapter": (lambda w: _search(w, "--force", output=w.a), "overlaps the input"),
    "search: missing dev file": (lambda w: _search(w, "--dev", w.root / "none.jsonl"), "none.jsonl: no such file"),
    "search: a dense recipe": (
        lambda w: ["search", _dense(w), "--dev", w.data, "-o", w.out],
        "the recipe must be an adapter recipe",
    ),
    "search: exact match on plain text": (
        lambda w: _search(w, "--dev", _file(w, "plain.txt", "reverse abc=cba\n"), "--text-field", "text"),
        "needs prompt/completion dev data",
    ),
    "search: an empty dev file": (lambda w: _search(w, "--dev", _file(w, "empty.jsonl", "")), "the file is empty"),
    "search: no dev examples asked for": (lambda w: _search(w, "--max-samples", "0"), "--max-samples must be at least"),
    "search: an unknown device": (lambda w: _search(w, "--device", "tpu"), "--device tpu: choose cpu, cuda or cuda:N"),
    # finetune
    "finetune: missing data": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.root / "none.jsonl", "-o", w.out],
        "none.jsonl: no such file",
    ),
    "finetune: zero steps": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "--steps", "0", "-o", w.out],
        "must be positive",
    ),
    "finetune: output is the adapter": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "-o", w.a, "--force"],
        "overlaps the input",
    ),
    "finetune: output is the base": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "-o", w.base, "--force"],
        "overlaps the input",
    ),
    "finetune: an unknown device": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "--device", "cuda:x", "-o", w.out],
        "--device cuda:x: choose cpu, cuda or cuda:N",
    ),
}


def _search(w: Workspace, *extra, output: Path | None = None) -> list:
    """``search`` of a TIES recipe of both adapters on the workspace's data (with ``extra`` options)."""
    recipe = {"merge_method": "ties", "adapters": [{"adapter": str(w.a)}, {"adapter": str(w.b)}]}
    path = _file(w, "search.yml", yaml.safe_dump(recipe))
    dev = [] if "--dev" in extra else ["--dev", w.data]
    return ["search", path, "--base", w.base, *dev, *extra, "-o", output or w.out, "--budget", "2"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_the_catalogue_is_large():
    assert len(CASES) >= 40
    assert {name.split(":")[0] for name in CASES} == {"merge", "run", "fold", "extract", "eval", "search", "finetune"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(case, ws):
    build, message = CASES[case]
    argv = build(ws)
    before = _digest(ws.root)
    result = run(*argv)
    output = Path(argv[argv.index("-o") + 1]) if "-o" in argv else ws.out
    if (output.exists() and output in (ws.a, ws.b, ws.base, ws.out)) or output.is_file():
        output = ws.root / "never-written"  # a case about an existing target: it must stay as it was
    assert_clean_failure(result, message, output)
    assert _digest(ws.root) == before, "an input changed"
    assert not (ws.root.parent / "cache").exists(), "a refused GGUF left a cached model"
