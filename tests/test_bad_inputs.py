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


def _foreign(w: Workspace) -> Path:
    """A folder holding a user's own files, which ``--force`` must not replace."""
    folder = w.root / "scratch"
    (folder / "sub").mkdir(parents=True)
    (folder / "important.txt").write_text("not loramerge's")
    (folder / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    return folder


def _file(w: Workspace, name: str, text: str) -> Path:
    (w.root / name).write_text(text)
    return w.root / name


def _as_dora(magnitude_rows: int | None = None) -> Callable[[Path], Path]:
    """Turn a LoRA adapter into a DoRA one: ``use_dora`` and a magnitude per module (one entry per output row,
    or ``magnitude_rows`` entries to corrupt it)."""

    def edit(folder: Path) -> Path:
        def add_magnitudes(state):
            for key in [k for k in state if k.endswith("lora_B.weight")]:
                rows = magnitude_rows or state[key].shape[0]
                state[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.full((rows,), 0.5)

        return _edit_tensors(_edit_config(folder, use_dora=True), add_magnitudes)

    return edit


def _as_loha_with_tucker(folder: Path) -> Path:
    """A LoHa adapter whose first module carries Tucker factors (PEFT's conv form)."""
    state = {}
    for key in [k for k in load_file(folder / "adapter_model.safetensors") if k.endswith("lora_A.weight")][:1]:
        module = key.removesuffix(".lora_A.weight")
        for part, shape in (("hada_w1_a", (128, 2)), ("hada_w1_b", (2, 256)), ("hada_w2_a", (128, 2)),
                            ("hada_w2_b", (2, 256)), ("hada_t1", (2, 2, 3, 3))):  # fmt: skip
            state[f"{module}.{part}"] = torch.ones(shape)
    save_file(state, folder / "adapter_model.safetensors")
    config = {"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _other_base(w: Workspace) -> Path:
    """A Llama of another width than the adapters' base."""
    from conftest import save_tiny_llama

    return save_tiny_llama(w.root / "other-base")


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


def _single_file(ws: Workspace, name: str, tensors: dict) -> Path:
    """A single-file LoRA in the inputs, holding ``tensors``."""
    from safetensors.torch import save_file

    save_file(tensors, ws.root / name)
    return ws.root / name


def _tiny_kohya(ws: Workspace) -> Path:
    """A kohya LoRA of one module in the inputs."""
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}
    return _single_file(ws, "k.safetensors", tensors)


def _kohya_dora(ws: Workspace, dora_scale: torch.Tensor) -> list:
    """``merge`` of a kohya DoRA file of one 4 x 3 module with this ``dora_scale``."""
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_x.dora_scale": dora_scale}  # fmt: skip
    return _merge_single_file(ws, "dora.safetensors", tensors)


def _recipe_of(adapters: list, **fields) -> dict:
    """A linear adapter recipe of ``adapters`` (and other top-level ``fields``)."""
    return {"merge_method": "linear", "adapters": [{"adapter": str(path)} for path in adapters], **fields}


def _single_file_run(ws: Workspace, *extra, **fields) -> list:
    """``run`` of a recipe of one kohya file (and top-level ``fields``) into a file beside the inputs."""
    return ["run", _recipe(ws, _recipe_of([_tiny_kohya(ws)], **fields)), "-o", ws.root.parent / "m.safetensors", *extra]


def _merge_single_file(ws: Workspace, name: str, tensors: dict) -> list:
    """``merge`` of one single-file LoRA holding ``tensors``, into a file beside the inputs."""
    return ["merge", _single_file(ws, name, tensors), "-o", ws.root.parent / "m.safetensors"]


def _foreign_file(ws: Workspace, name: str) -> Path:
    """A file in the inputs that loramerge did not write."""
    path = ws.root / name
    path.write_bytes(b"someone else's file")
    return path


def _existing_output(ws: Workspace) -> list:
    ws.out.mkdir()
    return _merge(ws)


def _merge(ws: Workspace, *extra) -> list:
    return ["merge", ws.a, ws.b, *extra, "-o", ws.out]


# name -> (argv built from the workspace, the one line it must print after "error: "; <in> and <out> stand for
# the workspace's input and output folders, "(…)" for a library's own words, which differ between versions)
CASES: dict[str, tuple[Callable[[Workspace], list], str]] = {
    # merge: unreadable or wrong adapters
    "merge: missing folder": (
        lambda w: ["merge", w.root / "nope", w.b, "-o", w.out],
        "adapter <in>/nope: no such folder",
    ),
    "merge: Hub id not available offline": (
        lambda w: ["merge", "someone/not-here", w.b, "-o", w.out],  # HF_HUB_OFFLINE=1 in the tests
        ("adapter someone/not-here: no such folder, and not fetched from the Hub (…)"),
    ),
    "merge: missing config": (
        _merge_broken(_delete("adapter_config.json")),
        "adapter <in>/broken: missing adapter_config.json",
    ),
    "merge: config not JSON": (
        _merge_broken(_overwrite("adapter_config.json", b"{r: 8")),
        (
            "adapter <in>/broken: adapter_config.json is not valid JSON (Expecting property name "
            "enclosed in double quotes: line 1 column 2 (char 1))"
        ),
    ),
    "merge: config is a list": (
        _merge_broken(_overwrite("adapter_config.json", b"[1, 2]")),
        "adapter <in>/broken: adapter_config.json must hold a JSON object",
    ),
    "merge: r is a string": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), r="8"), "-o", w.out],
        "adapter <in>/broken: field 'r' must be a positive number, got '8'",
    ),
    "merge: lora_alpha is a list": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), lora_alpha=[16]), "-o", w.out],
        "adapter <in>/broken: field 'lora_alpha' must be a positive number, got [16]",
    ),
    "merge: not a LoRA adapter": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), peft_type="IA3"), "-o", w.out],
        "merging through PEFT's fold needs the base model: give --base MODEL (or --fold-into)",
    ),
    "merge: an IA3 adapter that is no IA3 adapter, through PEFT's fold": (
        lambda w: [
            "merge",
            w.a,
            _edit_config(w.broken(), peft_type="IA3"),
            "--base",
            w.base,
            "--fold-into",
            w.base,
            "-o",
            w.out,
        ],
        "adapter <in>/broken: PEFT's fold changes no weight of <in>/base; nothing to merge",
    ),
    "merge: --dry-run via the dense path without a rank or a base to fold into": (
        lambda w: ["merge", w.a, w.b, "--via-dense", "--base", w.base, "--dry-run", "-o", w.out],
        "give --rank for the LoRA extracted from a merge through PEFT's fold, or --fold-into",
    ),
    "merge: via the dense path without a rank or a base to fold into": (
        lambda w: ["merge", w.a, w.b, "--via-dense", "--base", w.base, "-o", w.out],
        "give --rank for the LoRA extracted from a merge through PEFT's fold, or --fold-into",
    ),
    "merge: use_dora without magnitude vectors": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), use_dora=True), "-o", w.out],
        "adapter <in>/broken: module model.layers.0.mlp.down_proj has no lora_magnitude_vector but the config has "
        "use_dora=True",
    ),
    "merge: DoRA without a base": (
        lambda w: ["merge", w.a, _as_dora()(w.broken()), "-o", w.out],
        "adapter <in>/broken is a DoRA adapter: merging it needs the base model's weights (its row norms); give "
        "the base model (--base)",
    ),
    "merge: DoRA with a base of another shape": (
        lambda w: ["merge", w.a, _as_dora()(w.broken()), "--base", _other_base(w), "-o", w.out],
        "module model.layers.0.mlp.down_proj: the base <in>/other-base has a (64, 96) weight, the adapters' delta "
        "is (128, 256); is this the adapters' base?",
    ),
    "merge: DoRA magnitude of the wrong length": (
        lambda w: ["merge", w.a, _as_dora(magnitude_rows=7)(w.broken()), "--base", w.base, "-o", w.out],
        "adapter <in>/broken: module model.layers.0.mlp.down_proj has a lora_magnitude_vector of shape (7,); "
        "expected (128,)",
    ),
    "merge: LoHa with Tucker factors": (
        lambda w: ["merge", w.a, _as_loha_with_tucker(w.broken()), "-o", w.out],
        "adapter <in>/broken: module model.layers.0.mlp.down_proj is a LoHa with Tucker factors (hada_t1, from "
        "use_effective_conv2d on a convolution); only its Linear form can be merged",
    ),
    "merge: rank disagrees with config": (
        lambda w: ["merge", w.a, _edit_config(w.broken(), r=5), "-o", w.out],
        ("adapter <in>/broken: module model.layers.0.mlp.down_proj has rank 8 but the config gives r=5"),
    ),
    "merge: missing weights": (
        _merge_broken(_delete("adapter_model.safetensors")),
        "adapter <in>/broken: missing adapter_model.safetensors (or adapter_model.bin)",
    ),
    "merge: truncated safetensors": (
        _merge_broken(_truncate("adapter_model.safetensors")),
        "adapter <in>/broken: cannot read adapter_model.safetensors (…)",
    ),
    "merge: corrupt safetensors header": (
        _merge_broken(_overwrite("adapter_model.safetensors", b"\x10" + b"\x00" * 7 + b"{garbage}")),
        "adapter <in>/broken: cannot read adapter_model.safetensors (…)",
    ),
    "merge: .bin holding objects": (
        lambda w: ["merge", w.a, _bin(w.broken(), {"x": _NotATensor()}), "-o", w.out],
        ("adapter <in>/broken: cannot read adapter_model.bin as a plain state dict (it holds Python objects)"),
    ),
    "merge: .bin holding a list": (
        lambda w: ["merge", w.a, _bin(w.broken(), [torch.zeros(2)]), "-o", w.out],
        "adapter <in>/broken: adapter_model.bin is not a state dict of tensors",
    ),
    "merge: unexpected tensor": (
        _merge_broken(lambda f: _edit_tensors(f, lambda state: state.update({"extra.weight": torch.zeros(2)}))),
        "adapter <in>/broken: unexpected tensor 'extra.weight' (not a LORA factor nor modules_to_save)",
    ),
    "merge: different architecture": (
        lambda w: ["merge", w.a, _other_architecture(w), "-o", w.out],
        ("module model.layers.0.mlp.down_proj: <in>/other has delta shape (64, 128) but <in>/reverse has (128, 256)"),
    ),
    "merge: NaN in an adapter": (
        lambda w: ["merge", w.a, _edit_tensors(w.broken(), _poison(float("nan"))), "-o", w.out],
        (
            "adapter <in>/broken: tensor base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight "
            "holds NaN or Inf values; pass --allow-nonfinite to use it anyway"
        ),
    ),
    "merge: Inf in an adapter": (
        lambda w: ["merge", w.a, _edit_tensors(w.broken(), _poison(float("inf"))), "-o", w.out],
        (
            "adapter <in>/broken: tensor base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight "
            "holds NaN or Inf values; pass --allow-nonfinite to use it anyway"
        ),
    ),
    # merge: impossible parameters
    "merge: too few weights": (
        lambda w: _merge(w, "--weights", "1"),
        "got 1 weights for 2 adapters; give one weight per adapter",
    ),
    "merge: weights not numbers": (
        lambda w: _merge(w, "--weights", "1,x"),
        "--weights must be comma-separated numbers, got '1,x'",
    ),
    "merge: weights ending with a comma (a space after it, as the shell splits it)": (
        lambda w: _merge(w, "--weights", "1,"),
        "--weights '1,' ends with a comma: write the list without spaces (--weights 1,-0.5) or quote it",
    ),
    "merge: infinite weight": (
        lambda w: _merge(w, "--weights", "1,inf"),
        "weights must be finite numbers, got [1.0, inf]",
    ),
    "merge: all weights zero": (
        lambda w: _merge(w, "--weights", "0,0"),
        "weights are all zero ([0.0, 0.0]): the merge would be empty",
    ),
    "merge: density zero": (
        lambda w: _merge(w, "--method", "ties", "--density", "0"),
        "density: must be greater than 0 (got 0.0)",
    ),
    "merge: density above one": (
        lambda w: _merge(w, "--method", "ties", "--density", "1.5"),
        "density: must be less than or equal to 1 (got 1.5)",
    ),
    "merge: della's density + epsilon reaches one": (
        lambda w: _merge(w, "--method", "della", "--density", "0.9"),
        (
            "module model.layers.0.mlp.down_proj: della needs 0 < density - epsilon and density + "
            "epsilon < 1 (got 0.9, 0.15)"
        ),
    ),
    "merge: negative density": (
        lambda w: _merge(w, "--method", "dare_ties", "--density", "-0.2"),
        "density: must be greater than 0 (got -0.2)",
    ),
    "merge: rank zero": (lambda w: _merge(w, "--rank", "0"), "rank: must be greater than or equal to 1 (got 0)"),
    "merge: rank larger than possible": (
        lambda w: _merge(w, "--rank", "100000"),
        ("--rank 100000 is larger than any module allows: at most 128 (module model.layers.0.mlp.down_proj, 128x256)"),
    ),
    "merge: regmean without calibration files": (
        lambda w: _merge(w, "--method", "regmean", "--base", w.base),
        "--method regmean merges with each adapter's activations: give one --calibration FILE of prompts per adapter",
    ),
    "merge: regmean with too few calibration files": (
        lambda w: _merge(w, "--method", "regmean", "--base", w.base, "--calibration", w.data),
        "--calibration: 1 files for 2 adapters; give one per adapter, in the adapters' order",
    ),
    "merge: larv without a base": (
        lambda w: _merge(w, "--param", "larv=tiered"),
        "larv=tiered compares each module's update with the base model's weight: give the base model (--base)",
    ),
    "merge: larv on a method without it": (
        lambda w: _merge(w, "--method", "ties", "--param", "larv=tiered", "--base", w.base),
        "method ties has no parameter 'larv' (its parameters: none)",
    ),
    "merge: calibration for a method that takes no activations": (
        lambda w: _merge(w, "--calibration", w.data, "--calibration", w.data),
        "--calibration: method iso_c does not use activations (regmean does)",
    ),
    "merge: unknown method": (
        lambda w: _merge(w, "--method", "average"),
        (
            "method: unknown method 'average'; choose one of cat, svd, linear, task_arithmetic, ties, "
            "dare_linear, dare_ties, magnitude_prune, breadcrumbs, breadcrumbs_ties, della, "
            "della_linear, knots, tsv_m, iso_c, iso_cts, dc_merge, wudi, robustmerge, regmean"
        ),
    ),
    "merge: unknown space": (
        lambda w: _merge(w, "--method", "ties", "--space", "diagonal"),
        "space: must be 'core', 'full' or 'factors' (got 'diagonal')",
    ),
    "merge: factors with unequal ranks": (
        lambda w: _merge(w, "--method", "ties", "--space", "factors"),
        (
            "module model.layers.0.mlp.down_proj: --space factors needs equal ranks, got [8, 4]; use "
            "--space core or --space full"
        ),
    ),
    "merge: unknown dtype": (
        lambda w: _merge(w, "--dtype", "int8"),
        "dtype: must be 'float32', 'float16' or 'bfloat16' (got 'int8')",
    ),
    "merge: a method parameter out of range": (
        lambda w: _merge(w, "--method", "robustmerge", "--param", "floor=3"),
        "method robustmerge: parameter floor=3.0 must be a number in [0, 1]",
    ),
    "merge: knots with a whole-matrix inner method": (
        lambda w: _merge(w, "--method", "knots", "--param", "inner=iso_c"),
        (
            "method knots: parameter inner='iso_c' must be an element-wise adapter method: linear, "
            "task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, breadcrumbs, "
            "breadcrumbs_ties, della, della_linear"
        ),
    ),
    # merge: where the output goes
    "merge: output is an input": (
        lambda w: ["merge", w.a, w.b, "-o", w.a, "--force"],
        "output <in>/reverse overlaps the input <in>/reverse; choose another output folder",
    ),
    "merge: output inside an input": (
        lambda w: ["merge", w.a, w.b, "-o", w.a / "merged"],
        "output <in>/reverse/merged overlaps the input <in>/reverse; choose another output folder",
    ),
    "merge: output exists": (_existing_output, "output <out> already exists; pass --force to replace it"),
    "merge: output is a file": (
        lambda w: ["merge", w.a, w.b, "-o", _file(w, "file", "x"), "--force"],
        "output <in>/file exists and is not a folder",
    ),
    "merge: --force over a folder loramerge did not write": (
        lambda w: ["merge", w.a, w.b, "-o", _foreign(w), "--force"],
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
    ),
    # run: recipes
    "run: single-file LoRA beside a PEFT adapter": (
        lambda w: ["run", _recipe(w, _recipe_of([_tiny_kohya(w), w.a])), "-o", w.out],
        "adapters: <in>/k.safetensors is a single-file LoRA and <in>/reverse a PEFT adapter; merge files with files, "
        "folders with folders",
    ),
    "run: single-file LoRA written as a PEFT folder": (
        lambda w: ["run", _recipe(w, _recipe_of([_tiny_kohya(w)], output={"format": "adapter"})), "-o", w.out],
        "output.format: <in>/k.safetensors is a single-file LoRA; write it as kohya or diffusers, not adapter",
    ),
    "run: single-file recipe pushed to the Hub": (
        lambda w: _single_file_run(w, "--push-to-hub", "me/merged"),
        "--push-to-hub uploads a folder; this recipe writes one single-file LoRA",
    ),
    "run: single-file recipe folded into a base": (
        lambda w: _single_file_run(w, output={"base": str(w.base)}),
        "output.base: <in>/k.safetensors is a single-file LoRA, written as one file, not folded (a DoRA merge reads "
        "its base from base_model)",
    ),
    "run: missing recipe": (
        lambda w: ["run", w.root / "none.yml", "-o", w.out],
        "recipe <in>/none.yml: cannot read (No such file or directory)",
    ),
    "run: malformed YAML": (
        lambda w: ["run", _recipe(w, "merge_method: [ties\n"), "-o", w.out],
        ("recipe <in>/recipe.yml: malformed YAML at line 2, column 1 (expected ',' or ']', but got '<stream end>')"),
    ),
    "run: recipe is a list": (
        lambda w: ["run", _recipe(w, "- ties\n"), "-o", w.out],
        "recipe <in>/recipe.yml: a recipe is a YAML mapping, got list",
    ),
    "run: unknown key": (
        lambda w: ["run", _dense(w, merge_methd="ties"), "-o", w.out],
        "recipe <in>/recipe.yml: unknown key 'merge_methd' (did you mean 'merge_method'?)",
    ),
    "run: an unknown top-level recipe key": (
        lambda w: ["run", _recipe(w, {"merge_methd": "ties", "adapters": [{"adapter": str(w.a)}]}), "-o", w.out],
        "recipe <in>/recipe.yml: unknown key 'merge_methd' (did you mean 'merge_method'?)",
    ),
    "run: a misspelt key of an adapter entry": (
        lambda w: [
            "run",
            _recipe(w, {"merge_method": "ties", "adapters": [{"adapter": str(w.a), "wieght": 2}]}),
            "-o",
            w.out,
        ],
        "recipe <in>/recipe.yml: adapters[0]: unknown key 'wieght' (did you mean 'weight'?)",
    ),
    "run: a recipe dtype that does not exist": (
        lambda w: ["run", _dense(w, dtype="float8"), "-o", w.out],
        "recipe <in>/recipe.yml: dtype: must be 'float32', 'float16' or 'bfloat16' (got 'float8')",
    ),
    "run: unknown method": (
        lambda w: ["run", _dense(w, merge_method="average"), "-o", w.out],
        (
            "merge_method: unknown method 'average'; known: linear, task_arithmetic, ties, dare_linear, "
            "dare_ties, magnitude_prune, breadcrumbs, breadcrumbs_ties, della, della_linear, "
            "model_stock, slerp, nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram, "
            "ramplus_tl, passthrough"
        ),
    ),
    "run: missing model": (
        lambda w: ["run", _dense(w, base_model=str(w.root / "nope")), "-o", w.out],
        "base_model: model <in>/nope: no such folder",
    ),
    "run: density out of range": (
        lambda w: ["run", _dense(w, density=2.0), "-o", w.out],
        ("tensor model.embed_tokens.weight: density of <in>/base+<in>/reverse is 2.0; it must be in (0, 1]"),
    ),
    "run: layer_range past the model": (
        lambda w: ["run", _slices(w, [0, 9]), "-o", w.out],
        "slices[0].sources[0].layer_range: [0, 9] is out of bounds; <in>/base has 4 layers",
    ),
    "run: layer_range reversed": (
        lambda w: ["run", _slices(w, [3, 1]), "-o", w.out],
        "slices[0].sources[0].layer_range: [3, 1] is out of bounds; <in>/base has 4 layers",
    ),
    "run: absurd layer_range": (
        lambda w: ["run", _slices(w, [0, 10**9]), "-o", w.out],
        "slices[0].sources[0].layer_range: [0, 1000000000] is out of bounds; <in>/base has 4 layers",
    ),
    "run: NaN in a model": (
        lambda w: ["run", _nan_model(w), "-o", w.out],
        (
            "model <in>/nan_model: tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf values; "
            "pass --allow-nonfinite to use it anyway"
        ),
    ),
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
        ("tensor model.embed_tokens.weight: the weights are all zero ([0.0, 0.0]); the merge would be empty"),
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
        (
            "tensor model.embed_tokens.weight: the weights [1.0, -1.0] sum to zero, so normalize: true "
            "cannot divide by it"
        ),
    ),
    "run: adapter recipe with unknown parameter": (
        lambda w: ["run", _adapter_recipe(w, lambda_=0.3), "-o", w.out],
        (
            "parameters.lambda_: unknown parameter for adapter recipes (known: ['density', 'full_svd', "
            "'majority_sign', 'preset', 'rank', 'seed', 'space', 'strict'])"
        ),
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
        "weights are all zero ([0.0, 0.0]): the merge would be empty",
    ),
    "run: output is the base model": (
        lambda w: ["run", _dense(w), "-o", w.base, "--force"],
        "output <in>/base overlaps the input <in>/base; choose another output folder",
    ),
    "run: output inside the base model": (
        lambda w: ["run", _dense(w), "-o", w.base / "out"],
        "output <in>/base/out overlaps the input <in>/base; choose another output folder",
    ),
    "run: --force over a folder loramerge did not write": (
        lambda w: ["run", _dense(w), "-o", _foreign(w), "--force"],
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
    ),
    # fold
    "fold: adapter of another architecture": (
        lambda w: ["fold", _other_architecture(w), "--base", w.base, "-o", w.out],
        ("module model.layers.0.mlp.down_proj: the adapter needs a (64, 128) weight, the base has (128, 256)"),
    ),
    "fold: missing base": (
        lambda w: ["fold", w.a, "--base", w.root / "nope", "-o", w.out],
        "model <in>/nope: no such folder",
    ),
    "fold: NaN in the adapter": (
        lambda w: ["fold", _edit_tensors(w.broken(), _poison(float("nan"))), "--base", w.base, "-o", w.out],
        (
            "adapter <in>/broken: tensor base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight "
            "holds NaN or Inf values; pass --allow-nonfinite to use it anyway"
        ),
    ),
    "fold: unknown dtype": (
        lambda w: ["fold", w.a, "--base", w.base, "-o", w.out, "--dtype", "fp8"],
        "--dtype must be float32, float16 or bfloat16, got 'fp8'",
    ),
    "fold: GGUF model from a model folder": (
        lambda w: ["fold", w.a, "--base", w.base, "--format", "gguf", "-o", w.root.parent / "f.gguf"],
        "base <in>/base: a GGUF model is written from a GGUF base (its metadata and tokenizer); for a model folder, "
        "llama.cpp's convert_hf_to_gguf.py converts the folded model",
    ),
    "merge: single-file LoRA with DoRA norms per input column": (
        lambda w: _kohya_dora(w, torch.ones(1, 3)),
        "adapter <in>/dora.safetensors: module lora_unet_x: dora_scale (1, 3) holds a norm per input column (LyCORIS' "
        "wd_on_out=False); only DoRA with a norm per output row (out x 1) merges",
    ),
    "merge: single-file DoRA on a base without its module": (
        lambda w: [*_kohya_dora(w, torch.ones(4, 1)), "--base", w.base],
        "module lora_unet_x: the base <in>/base has no weight for it (components: transformer, unet)",
    ),
    "merge: LyCORIS Tucker core of another rank": (
        lambda w: _merge_single_file(
            w,
            "tucker.safetensors",
            {
                "lora_unet_x.hada_t1": torch.ones(4, 4, 3, 3),
                "lora_unet_x.hada_w1_a": torch.ones(2, 8),
                "lora_unet_x.hada_w1_b": torch.ones(2, 8),
                "lora_unet_x.hada_t2": torch.ones(4, 4, 3, 3),
                "lora_unet_x.hada_w2_a": torch.ones(2, 8),
                "lora_unet_x.hada_w2_b": torch.ones(2, 8),
            },
        ),
        "adapter <in>/tucker.safetensors: module lora_unet_x: Tucker factors hada_t1 (4, 4, 3, 3), hada_w1_a (2, 8), "
        "hada_w1_b (2, 8) do not pair",
    ),
    "merge: kohya LoCon core without a 1x1 down": (
        lambda w: _merge_single_file(
            w,
            "mid.safetensors",
            {
                "lora_unet_x.lora_down.weight": torch.ones(2, 8, 3, 3),
                "lora_unet_x.lora_mid.weight": torch.ones(2, 2, 3, 3),
                "lora_unet_x.lora_up.weight": torch.ones(8, 2, 1, 1),
            },
        ),
        "adapter <in>/mid.safetensors: module lora_unet_x: lora_mid (2, 2, 3, 3) and lora_down (2, 8, 3, 3) do not "
        "pair",
    ),
    "merge: kohya file without its up weight": (
        lambda w: _merge_single_file(w, "half.safetensors", {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}),
        "adapter <in>/half.safetensors: module lora_unet_x lacks its lora_down or lora_up weight",
    ),
    "merge: single-file output from an adapter folder": (
        lambda w: ["merge", w.a, "--format", "kohya", "-o", w.root.parent / "m.safetensors"],
        "--format kohya merges single-file LoRAs (kohya or diffusers .safetensors), not <in>/reverse",
    ),
    "merge: GGUF output not named .gguf": (
        lambda w: ["merge", w.a, w.b, "--format", "gguf", "--base", w.base, "-o", w.out],
        "output <out>: a GGUF output is one file named *.gguf",
    ),
    "merge: GGUF adapter in a type only models take": (
        lambda w: ["merge", w.a, w.b, "--format", "gguf", "--gguf-type", "q4_0", "-o", w.root.parent / "m.gguf"],
        "--gguf-type must be one of f32, f16, bf16, q8_0, got 'q4_0'",
    ),
    "merge: GGUF type without a GGUF output": (
        lambda w: ["merge", w.a, w.b, "--gguf-type", "f16", "-o", w.out],
        "--gguf-type is the tensor type of --format gguf; --format peft takes --dtype",
    ),
    "merge: GGUF adapter with a dtype": (
        lambda w: ["merge", w.a, w.b, "--format", "gguf", "--dtype", "float16", "-o", w.root.parent / "m.gguf"],
        "--format gguf writes its tensors in --gguf-type; it does not combine with --dtype",
    ),
    "fold: GGUF type for a safetensors fold": (
        lambda w: ["fold", w.a, "--base", w.base, "--gguf-type", "q8_0", "-o", w.out],
        "--gguf-type is the tensor type of --format gguf; a safetensors fold takes --dtype or --quantize",
    ),
    "merge: GGUF adapter over a file loramerge did not write": (
        lambda w: ["merge", w.a, "--format", "gguf", "--base", w.base, "-o", _foreign_file(w, "x.gguf"), "--force"],
        "output <in>/x.gguf is not a GGUF file loramerge wrote; --force replaces only those",
    ),
    "merge: GGUF adapter for an architecture llama.cpp names otherwise": (
        lambda w: [
            "merge",
            w.a,
            "--format",
            "gguf",
            "--base",
            _gguf(w, "odd.gguf", architecture="tinyarch"),
            "-o",
            w.root.parent / "m.gguf",
        ],
        "base <in>/odd.gguf: llama.cpp adapters are written for llama, qwen2, qwen3, gemma, gemma2, gemma3 bases "
        "here, not 'tinyarch'",
    ),
    "fold: unknown 4-bit type": (
        lambda w: ["fold", w.a, "--base", w.base, "-o", w.out, "--quantize", "--quant-type", "int3"],
        "--quant-type must be nf4 or fp4, got 'int3'",
    ),
    "fold: output is the base": (
        lambda w: ["fold", w.a, "--base", w.base, "-o", w.base, "--force"],
        "output <in>/base overlaps the input <in>/base; choose another output folder",
    ),
    "fold: --force over a folder loramerge did not write": (
        lambda w: ["fold", w.a, "--base", w.base, "-o", _foreign(w), "--force"],
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
    ),
    # extract
    "extract: missing model": (
        lambda w: ["extract", w.root / "nope", "--base", w.base, "-o", w.out, "--rank", "4"],
        "model <in>/nope: no such folder",
    ),
    "extract: shapes differ": (
        lambda w: ["extract", save_llama(w.root / "small", 1, hidden=64), "--base", w.base, "-o", w.out, "--rank", "4"],
        "tensor lm_head.weight: <in>/small has shape (128, 64), the base (64, 128)",
    ),
    "extract: rank zero": (
        lambda w: ["extract", w.base, "--base", w.base, "-o", w.out, "--rank", "0"],
        "--rank must be at least 1, got 0",
    ),
    "extract: --force over a folder loramerge did not write": (
        lambda w: ["extract", w.base, "--base", w.base, "-o", _foreign(w), "--force", "--rank", "4"],
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
    ),
    "extract: output is the model": (
        lambda w: ["extract", w.base, "--base", w.base, "-o", w.base, "--force", "--rank", "4"],
        "output <in>/base overlaps the input <in>/base; choose another output folder",
    ),
    # eval
    "eval: missing data": (
        lambda w: ["eval", "--base", w.base, "--data", w.root / "none.jsonl"],
        "--data <in>/none.jsonl: no such file",
    ),
    "eval: unknown data format": (
        lambda w: ["eval", "--base", w.base, "--data", _file(w, "data.xml", "x")],
        "--data <in>/data.xml: unknown format '.xml'; use .jsonl, .json, .csv, .parquet, .txt",
    ),
    "eval: unknown field": (
        lambda w: [
            "eval",
            "--base",
            w.base,
            "--data",
            w.data,
            "--prompt-field",
            "question",
            "--completion-field",
            "completion",
        ],
        "--data <in>/data.jsonl: no field 'question' (fields: prompt, completion, text)",
    ),
    "eval: whole texts and pairs at once": (
        lambda w: ["eval", "--base", w.base, "--data", w.data, "--prompt-field", "prompt", "--text-field", "text"],
        "give either --text-field (whole texts) or --prompt-field/--completion-field (pairs), not both",
    ),
    "eval: corrupt JSONL": (
        lambda w: ["eval", "--base", w.base, "--data", _file(w, "bad.jsonl", '{"text": ')],
        "--data <in>/bad.jsonl: cannot read (…)",
    ),
    "eval: base without tokenizer": (
        lambda w: ["eval", "--base", save_llama(w.root / "no_tokenizer", 2), "--data", w.data],
        ("model <in>/no_tokenizer: cannot load it with its tokenizer (…)"),
    ),
    "eval: adapter for another base": (
        lambda w: ["eval", "--base", w.base, "--adapter", _other_architecture(w), "--data", w.data],
        ("adapter <in>/other: cannot load it on <in>/base (…)"),
    ),
    # GGUF models (read through transformers, cached as safetensors): refused before anything is cached
    "fold: truncated GGUF base": (
        lambda w: ["fold", w.a, "--base", _gguf(w, "cut.gguf", cut=True), "-o", w.out],
        ("model <in>/cut.gguf: truncated or corrupt GGUF file (…)"),
    ),
    "eval: .gguf file that is not GGUF": (
        lambda w: ["eval", "--base", _file(w, "fake.gguf", "not a model"), "--data", w.data],
        "model <in>/fake.gguf: not a GGUF file (no GGUF magic number)",
    ),
    "run: GGUF base of an architecture transformers cannot load": (
        lambda w: ["run", _dense(w, base_model=str(_gguf(w, "odd.gguf", architecture="tinyarch"))), "-o", w.out],
        ("base_model: model <in>/odd.gguf: cannot read this GGUF file (…)"),
    ),
    "fold: GGUF base missing a tensor": (
        lambda w: ["fold", w.a, "--base", _gguf(w, "holed.gguf", skip=("blk.1.ffn_down.weight",)), "-o", w.out],
        ("model <in>/holed.gguf: the GGUF file has no tensor for model.layers.1.mlp.down_proj.weight (1 missing)"),
    ),
    "extract: missing GGUF base": (
        lambda w: ["extract", w.base, "--base", w.root / "none.gguf", "-o", w.out, "--rank", "4"],
        "model <in>/none.gguf: no such GGUF file",
    ),
    "eval: GGUF in a package that is not installed": (
        lambda w: ["eval", "--base", "pkg:not_installed_models/model.gguf", "--data", w.data],
        ("model pkg:not_installed_models/model.gguf: Python package 'not_installed_models' is not installed"),
    ),
    # search
    "search: a parameter the method lacks": (
        lambda w: _search(w, "--tune", "gamma=0:1"),
        "--tune: method ties has no numeric parameter 'gamma' (density)",
    ),
    "search: a density bound above 1": (
        lambda w: _search(w, "--tune", "density=0.5:1.5"),
        "--tune: a bound is out of range: density: must be less than or equal to 1 (got 1.5)",
    ),
    "search: bounds the wrong way round": (
        lambda w: _search(w, "--weight-range", "2:0"),
        "--weight-range: the low bound must be below the high one, got 2 and 0",
    ),
    "search: output is an input adapter": (
        lambda w: _search(w, "--force", output=w.a),
        "output <in>/reverse overlaps the input <in>/reverse; choose another output folder",
    ),
    "search: missing dev file": (
        lambda w: _search(w, "--data", w.root / "none.jsonl"),
        "--data <in>/none.jsonl: no such file",
    ),
    "search: a dense recipe": (
        lambda w: ["search", _dense(w), "--data", w.data, "-o", w.out],
        "search: the recipe must be an adapter recipe (an `adapters:` list)",
    ),
    "search: exact match on plain text": (
        lambda w: _search(w, "--data", _file(w, "plain.txt", "reverse abc=cba\n"), "--text-field", "text"),
        "--objective exact_match needs prompt/completion dev data; use --objective loss",
    ),
    "search: gradients through a method that is not linear in its weights": (
        lambda w: _search(w, "--gradient"),
        "search with gradients learns task arithmetic's coefficients (AdaMerging): the recipe's method must be "
        "linear, cat or task_arithmetic, not ties",
    ),
    "search: gradients on exact match": (
        lambda w: _search(w, "--gradient", "--objective", "exact_match"),
        "--objective exact_match: with gradients choose entropy or loss",
    ),
    "search: an empty dev file": (
        lambda w: _search(w, "--data", _file(w, "empty.jsonl", "")),
        "--data <in>/empty.jsonl: the file is empty",
    ),
    "search: no dev examples asked for": (
        lambda w: _search(w, "--max-samples", "0"),
        "--max-samples must be at least 1, got 0",
    ),
    "search: an unknown device": (lambda w: _search(w, "--device", "tpu"), "--device tpu: choose cpu, cuda or cuda:N"),
    # finetune
    "finetune: missing data": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.root / "none.jsonl", "-o", w.out],
        "--data <in>/none.jsonl: no such file",
    ),
    "finetune: whole texts, no prompt/completion pairs": (
        lambda w: [
            "finetune",
            w.a,
            "--base",
            w.base,
            "--data",
            _file(w, "plain.jsonl", '{"text": "abc"}\n'),
            "-o",
            w.out,
        ],
        "--data <in>/plain.jsonl: finetune trains on prompt/completion pairs, and this file has whole texts; give "
        "--prompt-field and --completion-field",
    ),
    "finetune: zero steps": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "--steps", "0", "-o", w.out],
        "--steps, --batch-size and --lr must be positive",
    ),
    "finetune: output is the adapter": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "-o", w.a, "--force"],
        "output <in>/reverse overlaps the input <in>/reverse; choose another output folder",
    ),
    "finetune: output is the base": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "-o", w.base, "--force"],
        "output <in>/base overlaps the input <in>/base; choose another output folder",
    ),
    "finetune: --force over a folder loramerge did not write": (
        lambda w: ["finetune", w.a, "--base", w.base, "--data", w.data, "-o", _foreign(w), "--force"],
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
    ),
    "search: --force over a folder loramerge did not write": (
        lambda w: _search(w, "--force", output=_foreign(w)),
        (
            "output <in>/scratch holds files loramerge did not write (important.txt, sub, "
            "sub/thesis.tex); --force only replaces an empty folder or one loramerge wrote: choose "
            "another output folder or remove them yourself"
        ),
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
    dev = [] if "--data" in extra else ["--data", w.data]
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
    output = Path(argv[argv.index("-o") + 1]) if "-o" in argv else ws.out
    if output.exists():  # a case about an existing target: it must stay as it was (the digest checks it)
        assert output == ws.out or ws.root in output.parents, output
        output = ws.root / "never-written"
    result = run(*argv)
    expected = "error: " + message.replace("<in>", str(ws.root)).replace("<out>", str(ws.out))
    assert_clean_failure(result, expected, output, whole_line=True)
    assert _digest(ws.root) == before, "an input changed"
    assert not (ws.root.parent / "cache").exists(), "a refused GGUF left a cached model"
