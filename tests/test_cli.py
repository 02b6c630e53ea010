"""The command line: inspect, merge, dry runs, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run
from loramerge import catalogue


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
    assert sorted(p.name for p in out.iterdir()) == [
        ".loramerge.json",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
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


def test_console_script_end_to_end(mixed_adapters, tmp_path):
    """The installed ``loramerge`` entry point, as a user runs it."""
    exe = [sys.executable, "-c", "from loramerge.cli.app import main; main()"]
    ok = subprocess.run([*exe, "inspect", *map(str, mixed_adapters)], capture_output=True, text=True)
    assert ok.returncode == 0 and "adapters" in ok.stdout
    bad = subprocess.run(
        [*exe, "merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_one_adapter_is_one_adapter_and_iso_c_says_it_changes_it(mixed_adapters, tmp_path):
    """A lone adapter is not "1 adapters"; and the default method reshapes even a lone adapter, which a user
    merging one (to change its dtype, say) must be told, with the method that copies it."""
    default = run("merge", mixed_adapters[0], "-o", tmp_path / "iso_c")
    assert default.exit_code == 0, default.output
    assert default.stdout.startswith("merged 1 adapter, 14 modules, method=iso_c ")
    assert default.stderr.splitlines() == [
        "warning: one adapter: iso_c flattens its singular values, so the output differs from the input; "
        "use --method linear to copy it"
    ]
    copy = run("merge", mixed_adapters[0], "--method", "linear", "-o", tmp_path / "linear")
    assert copy.exit_code == 0 and copy.stderr == "", copy.output
    assert copy.stdout.startswith("merged 1 adapter, 14 modules, method=linear ")


def _one_adapter_merge(adapter, **options):
    from loramerge.adapters.merge import execute_plan, plan_merge
    from loramerge.adapters.options import parse_options

    plan = plan_merge([adapter], None, parse_options(**options))
    warned = [warning for warning in plan.warnings if warning.startswith("one adapter:")]
    merged = execute_plan(plan)
    change = max(
        (torch.linalg.norm(merged.modules[name].delta() - module.delta()) / torch.linalg.norm(module.delta())).item()
        for name, module in adapter.modules.items()
    )
    return change, warned


@pytest.mark.parametrize("method", [m for m in catalogue.adapter_methods() if not catalogue.method(m).calibrated])
def test_the_one_adapter_warning_comes_exactly_when_the_method_changes_it(method, mixed_adapters):
    """Measured, not assumed: every adapter method on one adapter, at its defaults and at density 1 (where the
    trimming and dropping methods keep every entry), warns if and only if the output differs from the input."""
    from loramerge import load_adapter

    adapter = load_adapter(mixed_adapters[0])
    for density in (None, 1.0):
        change, warned = _one_adapter_merge(adapter, method=method, density=density)
        assert bool(warned) == (change > 1e-4), (method, density, change, warned)


def test_fold_leaves_no_blank_line_on_stderr(mixed_adapters, llama_base, tmp_path):
    """Where stderr is no terminal (a log, a pipe) the progress bar draws nothing, and must not leave the
    empty line rich ends a bar with there either: a refusal is its one line, a success prints nothing."""
    missing = tmp_path / "nope"
    refused = run("fold", mixed_adapters[0], "--base", missing, "-o", tmp_path / "refused")
    assert refused.exit_code == 2
    assert refused.stderr == f"error: model {missing}: no such folder\n"
    folded = run("fold", mixed_adapters[0], "--base", llama_base, "-o", tmp_path / "folded")
    assert folded.exit_code == 0, folded.output
    assert folded.stderr == ""


def test_a_long_step_reports_progress_lines_where_stderr_is_no_terminal(mixed_adapters, llama_base, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """A job longer than ``PROGRESS_LINE_SECONDS`` writes lines to a log; here the interval is 0, so every step
    writes one, the last reaching the total (and with the real interval, this short fold writes none)."""
    from loramerge.cli import present

    monkeypatch.setattr(present, "PROGRESS_LINE_SECONDS", 0.0)
    folded = run("fold", mixed_adapters[0], "--base", llama_base, "-o", tmp_path / "folded")
    assert folded.exit_code == 0, folded.output
    lines = folded.stderr.splitlines()
    assert lines and all(line.startswith("folding: ") for line in lines), folded.stderr
    done, total = lines[-1].split()[1].split("/")
    assert done == total and int(total) > 1


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["merge", "--help"], ["fold", "--help"], ["run", "--help"], ["search", "--help"],
     ["merge"], ["merge", "a", "--nope"], ["fold", "x"]],
)  # fmt: skip
def test_help_version_and_argument_errors_do_not_import_torch(args):
    """What makes ``loramerge --help`` and a mistyped command answer at once: torch (seconds to import) is not
    imported before a command runs its library call."""
    code = (
        "import sys\nfrom loramerge.cli.app import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", (args, result.stdout[-500:], result.stderr[-500:])


def test_version_names_the_package():
    from loramerge import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"loramerge {__version__}"


def test_weights_split_by_the_shell_after_a_comma_are_joined(mixed_adapters, tmp_path, monkeypatch):
    """``--weights 1, -0.5`` reaches the program as ``1,`` and ``-0.5``: the console script joins them, so the
    merge is the one with weights 1 and -0.5 (a negative number would otherwise read as an option)."""
    from loramerge.cli.app import main

    first, second = (str(path) for path in mixed_adapters[:2])
    outputs = {}
    for name, weights in (("spaced", ["1,", "-0.5"]), ("joined", ["1,-0.5"])):
        outputs[name] = tmp_path / name
        argv = ["loramerge", "merge", first, second, "--weights", *weights, "--method", "linear", "-o", outputs[name]]
        monkeypatch.setattr(sys, "argv", [str(arg) for arg in argv])
        with pytest.raises(SystemExit) as ended:
            main()
        assert ended.value.code == 0
    spaced, joined = (load_file(outputs[name] / "adapter_model.safetensors") for name in ("spaced", "joined"))
    assert spaced.keys() == joined.keys() and all(torch.equal(spaced[k], joined[k]) for k in spaced)


def test_inspect_is_readable_in_80_columns(mixed_adapters):
    """Nothing cut short: no line wider than the terminal, no ellipsis, every adapter's path whole once the
    folded lines of its column are put back together."""
    from typer.testing import CliRunner

    from loramerge.cli.app import app

    result = CliRunner().invoke(app, ["inspect", "--modules", *map(str, mixed_adapters)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    cells = "".join(part.strip() for line in lines for part in line.split("│")[1:-1])  # the table's cell text
    for path in mixed_adapters:
        assert str(path).replace(" ", "") in cells.replace(" ", "") or str(path) in result.stdout, path
    assert all(field in result.stdout for field in ("type", "base model", "ranks", "scale", "mean ‖Δ‖"))


def test_out_shard_size_reaches_every_full_model_output(mixed_adapters, llama_base, tmp_path):
    """``--out-shard-size`` means one thing wherever a full model is written: ``merge --fold-into`` and an
    adapter recipe folded by ``run`` shard at it too (it used to be ignored there); an adapter output warns."""
    import yaml

    first, second = (str(path) for path in mixed_adapters[:2])
    folded = run("merge", first, second, "--fold-into", llama_base, "--out-shard-size", "100KB", "-o",
                 tmp_path / "folded")  # fmt: skip
    assert folded.exit_code == 0, folded.output
    assert len(list((tmp_path / "folded").glob("model-*.safetensors"))) > 1
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "adapters": [{"adapter": first}, {"adapter": second}],
                                      "output": {"format": "dense", "base": str(llama_base)}}))  # fmt: skip
    ran = run("run", recipe, "--out-shard-size", "100KB", "-o", tmp_path / "ran")
    assert ran.exit_code == 0, ran.output
    assert len(list((tmp_path / "ran").glob("model-*.safetensors"))) > 1
    adapter = run("merge", first, second, "--out-shard-size", "100KB", "-o", tmp_path / "adapter")
    assert adapter.exit_code == 0 and "applies to a full model" in adapter.stderr
