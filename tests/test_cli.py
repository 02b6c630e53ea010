"""The command line: inspect, merge, dry runs, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter, save_tiny_llama


def test_inspect_reports_ranks_scales_and_agreement(mixed_adapters):
    result = run("inspect", "--json", *mixed_adapters)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    first, second, third = report["adapters"]
    assert first["ranks"] == {"4": 14} and first["scales"] == [2.0]
    assert second["use_rslora"] and second["scales"] == [pytest.approx(4 / 8**0.5, rel=1e-5)]
    assert third["ranks"] == {"2": 5, "6": 1} and 2.5 in third["scales"]  # alpha_pattern down_proj: 5 / 2
    assert report["set"]["shared_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(report["set"]["pairs"]) == 3
    assert "model.embed_tokens" in report["set"]["only_in"][str(mixed_adapters[1])]
    tables = run("inspect", "--modules", *mixed_adapters)
    assert tables.exit_code == 0 and "pairwise agreement" in tables.stdout and "largest deltas" in tables.stdout


def test_merge_writes_a_peft_folder(mixed_adapters, tmp_path):
    out = tmp_path / "merged"
    result = run(
        "merge", *mixed_adapters, "--weights", "0.5,0.3,0.2", "--method", "ties", "--density", "0.5", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and config["use_rslora"] is False
    assert set(config["target_modules"]) >= {"q_proj", "down_proj", "embed_tokens"}
    assert all(config["alpha_pattern"][name] == rank for name, rank in config["rank_pattern"].items())
    assert "ties" in result.stdout and not list(tmp_path.glob(".*loramerge-tmp"))
    again = run("merge", *mixed_adapters, "--method", "svd", "--dtype", "bfloat16", "--force", "-o", out)
    assert again.exit_code == 0, again.output
    assert next(iter(load_file(out / "adapter_model.safetensors").values())).dtype == torch.bfloat16


def test_dry_run_prints_the_plan_and_writes_nothing(mixed_adapters, tmp_path):
    result = run("merge", *mixed_adapters, "--method", "cat", "--dry-run", "-o", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.stdout and "model.layers.1.self_attn.q_proj" in result.stdout
    assert "18" in result.stdout  # cat rank of layers.1 q_proj: 4 + 8 + 6
    assert not (tmp_path / "never").exists()


def test_warns_about_different_base_models_and_refuses_with_strict(mixed_adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(mixed_adapters[0], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (other / "adapter_config.json").write_text(json.dumps(config))
    loose = run("merge", mixed_adapters[1], other, "-o", tmp_path / "loose")
    assert loose.exit_code == 0 and "different base models" in loose.stderr
    strict = run("merge", mixed_adapters[1], other, "--strict", "-o", tmp_path / "strict")
    assert strict.exit_code == 2 and "different base models" in strict.stderr
    assert not (tmp_path / "strict").exists()


def test_bin_adapters_are_read_with_weights_only(mixed_adapters, tmp_path):
    folder = tmp_path / "as_bin"
    shutil.copytree(mixed_adapters[0], folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    result = run("merge", folder, mixed_adapters[0], "--method", "linear", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def _edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _write(folder, name, data: bytes):
    (folder / name).write_bytes(data)


class _NotATensor:
    pass


def _bad_pickle(folder):
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": _NotATensor()}, folder / "adapter_model.bin")


def _other_base_adapter(folder):
    base = save_tiny_llama(folder.parent / "other_base_model")
    import transformers

    config = transformers.AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = 32, 48
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    shutil.rmtree(folder)
    build_adapter(base, folder, seed=5)


def _wrong_rank(folder):
    _edit_config(folder, r=7)


BROKEN_ADAPTERS = {
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), "missing adapter_config.json"),
    "config not json": (lambda f: _write(f, "adapter_config.json", b"{not json"), "not valid JSON"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "use_dora"),
    "lora_bias": (lambda f: _edit_config(f, lora_bias=True), "lora_bias"),
    "not lora": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type is 'IA3'"),
    "r is a string": (lambda f: _edit_config(f, r="4"), "'r' must be a positive number"),
    "rank disagrees": (_wrong_rank, "the config gives r=7"),
    "missing weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    "corrupt safetensors": (lambda f: _write(f, "adapter_model.safetensors", b"\x08\x00garbage"), "cannot read"),
    "pickle with objects": (_bad_pickle, "plain state dict"),
    "different architecture": (_other_base_adapter, "delta shape"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_broken_adapter_is_one_clear_line(case, mixed_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mixed_adapters[0], broken)
    mutate, message = BROKEN_ADAPTERS[case]
    mutate(broken)
    before = {p.name: p.read_bytes() for p in mixed_adapters[0].iterdir()}
    result = run("merge", mixed_adapters[0], broken, "-o", tmp_path / "out")
    assert_clean_failure(result, message, tmp_path / "out")
    assert before == {p.name: p.read_bytes() for p in mixed_adapters[0].iterdir()}


BAD_ARGUMENTS = {
    "too few weights": (["--weights", "1,2"], "got 2 weights for 3 adapters"),
    "weights not numbers": (["--weights", "1,a,2"], "--weights must be comma-separated numbers"),
    "unknown method": (["--method", "average"], "unknown method 'average'"),
    "density zero": (["--method", "ties", "--density", "0"], "density"),
    "density above one": (["--method", "ties", "--density", "1.5"], "density"),
    "rank zero": (["--rank", "0"], "rank"),
    "unknown space": (["--method", "ties", "--space", "diagonal"], "space"),
    "unknown majority sign": (["--method", "ties", "--majority-sign", "most"], "majority_sign"),
    "factors with unequal ranks": (["--method", "ties", "--space", "factors"], "needs equal ranks"),
    "unknown dtype": (["--dtype", "int8"], "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_one_clear_line(case, mixed_adapters, tmp_path):
    extra, message = BAD_ARGUMENTS[case]
    result = run("merge", *mixed_adapters, *extra, "-o", tmp_path / "out")
    assert_clean_failure(result, message, tmp_path / "out")


def test_output_rules(mixed_adapters, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert_clean_failure(run("merge", *mixed_adapters, "-o", existing), "pass --force", tmp_path / "none")
    inside = mixed_adapters[0] / "merged"
    assert_clean_failure(run("merge", *mixed_adapters, "-o", inside), "overlaps the input", inside)
    assert_clean_failure(run("merge", mixed_adapters[0], "-o", mixed_adapters[0], "--force"), "overlaps", inside)
    assert (mixed_adapters[0] / "adapter_config.json").exists()


def test_missing_folder_and_unreachable_hub_id(tmp_path):
    assert_clean_failure(run("merge", tmp_path / "nope", "-o", tmp_path / "out"), "no such folder", tmp_path / "out")
    result = run("merge", "someone/not-here", "-o", tmp_path / "out")  # HF_HUB_OFFLINE=1 in the tests
    assert_clean_failure(result, "not fetched from the Hub", tmp_path / "out")


def test_console_script_end_to_end(mixed_adapters, tmp_path):
    """The installed ``loramerge`` entry point, as a user runs it."""
    exe = [sys.executable, "-c", "from loramerge.cli.app import main; main()"]
    ok = subprocess.run([*exe, "inspect", *map(str, mixed_adapters)], capture_output=True, text=True)
    assert ok.returncode == 0 and "adapters" in ok.stdout
    bad = subprocess.run(
        [*exe, "merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
