"""The ``dp-microclip`` command line: every command's --help, --json, one-line errors with status 2, delta warnings.

Most tests call ``main(argv)`` in-process; two run the installed
``dp-microclip`` executable in a subprocess. Nothing here trains for more
than a few steps.
"""

from __future__ import annotations

import argparse
import doctest
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

import accounting.cli
from dp_microclip import cli
from dp_microclip.cli import COMMANDS, main

EXE = os.path.join(os.path.dirname(sys.executable), "dp-microclip")
RUN = ["--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5", "--accountant", "rdp"]
TINY_AUDIT = ["--canaries", "4", "--fillers", "12", "--steps", "3", "--sample-rate", "0.5", "--accountant", "pld"]


def _one_error_line(capsys, command: str | None) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    prefix = f"dp-microclip {command}: error: " if command else "dp-microclip: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def test_top_level_help_lists_every_command(capsys):
    assert main([]) == 0
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dp-microclip {demo,epsilon,noise,sweep,bench,audit}")
    for name, command in COMMANDS.items():
        assert f"  {name}" in out and command.summary in out
    assert "examples:" in out


def test_version(capsys):
    import dp_microclip

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dp-microclip {dp_microclip.__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dp-microclip {command}"), out[:200]
    assert "example" in out.lower()
    assert "python -m" not in out.split("\n", 1)[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["epsilon", "--noise-multiplier", "1", "--steps", "10"],  # no --delta
        ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "x", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sample-rate", "nan", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
        ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
        ["epsilon", "--sample-rate", "0", "--noise-multiplier", "1", "--epochs", "2", "--delta", "1e-5"],
        ["epsilon", *RUN, "--noise-multiplier", "1", "--unknown-flag"],
        ["noise", *RUN, "--target-epsilon", "-1"],
        ["noise", *RUN],  # no --target-epsilon
        ["noise", *RUN[:-2], "--accountant", "nope", "--target-epsilon", "1"],
        ["audit", "--canaries", "x"],
        ["audit", "--canaries", "1"],
        ["demo", "--epochs", "x"],
        ["sweep", "--epochs", "x"],
        ["bench", "--models", "no_such_model"],
        ["bench", "--models", "mlp", "--b", "0"],
        ["bench", "--models", "mlp", "--b", "x"],
    ],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    command = argv[0] if argv[0] in COMMANDS else None
    _one_error_line(capsys, command)


def test_epsilon_json_parses_and_matches_the_text(capsys):
    assert main(["epsilon", *RUN, "--noise-multiplier", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert main(["epsilon", *RUN, "--noise-multiplier", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"epsilon = {data['epsilon']:.6g} ")
    assert data["command"] == "epsilon" and data["steps"] == 100 and data["sample_rate"] == 0.01
    assert data["statement"].startswith("DP-SGD privacy statement") and data["warnings"] == []


def test_epsilon_json_writes_infinity_as_null(capsys):
    assert main(["epsilon", *RUN, "--noise-multiplier", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"inf"' not in out and "Infinity" not in out
    assert json.loads(out)["epsilon"] is None


def test_noise_json_round_trips_through_epsilon(capsys):
    argv = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5", "--accountant", "rdp",
            "--micro-batch-size", "4", "--json"]
    assert main(["noise", *argv, "--target-epsilon", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "noise" and data["accountant_noise_multiplier"] == pytest.approx(data["noise_multiplier"] / 2)
    assert main(["epsilon", *argv, "--noise-multiplier", repr(data["noise_multiplier"])]) == 0
    assert 1.98 <= json.loads(capsys.readouterr().out)["epsilon"] <= 2.0


def test_delta_not_below_one_over_n_warns_on_stderr_and_in_json(capsys):
    argv = ["epsilon", "--batch-size", "10", "--dataset-size", "1000", "--noise-multiplier", "1", "--steps", "10",
            "--accountant", "rdp"]
    assert main([*argv, "--delta", "1e-5"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--delta", "1e-3", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("dp-microclip epsilon: warning: delta = 0.001 is not below 1/N")
    assert "N = 1000" in json.loads(captured.out)["warnings"][0]
    # --sample-rate with --dataset-size: N is known too.
    assert main(["noise", "--sample-rate", "0.01", "--dataset-size", "100", "--steps", "10", "--delta", "0.02",
                 "--target-epsilon", "5", "--accountant", "rdp"]) == 0
    assert "warning: delta = 0.02 is not below 1/N" in capsys.readouterr().err


def test_audit_delta_warning_counts_fillers_and_canaries():
    assert cli._audit_delta_warning(["--delta", "1e-5"]) is None  # defaults: N <= 2000
    warning = cli._audit_delta_warning(["--delta", "0.01", "--canaries", "40", "--fillers", "60"])
    assert warning is not None and "N = 100" in warning
    assert cli._audit_delta_warning(["--delta", "x"]) is None  # audit's own parser reports it


def test_audit_json_parses(capsys):
    assert main(["audit", *TINY_AUDIT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_canaries"] == 4 and data["steps"] == 3
    assert "lower_bound" in data and "claimed_epsilon" in data


@pytest.mark.parametrize(
    "command, missing, says",
    [
        ("bench", ("benchmarks", "benchmarks.bench"), "benchmarks/ folder"),
        ("demo", ("tutorials", "tutorials.demo_digits"), "tutorials/ folder"),
        ("sweep", ("dp_microclip.tools.sweep",), "no dp_microclip.tools.sweep module"),
    ],
)
def test_a_command_whose_code_is_not_installed_says_how_to_get_it(command, missing, says, monkeypatch, capsys):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail as if it were not installed
    assert main([command]) == 2
    assert says in _one_error_line(capsys, command)
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dp-microclip {command}") and "not available" in out and "example" in out


def test_a_missing_dependency_of_a_command_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--epochs", "1"]) == 2
    assert "sklearn" in _one_error_line(capsys, "demo")


def test_demo_runs(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--epochs", "1", "--batch-size", "128"]) == 0
    assert "test accuracy with micro-batch clipping (b=8" in capsys.readouterr().out


def test_argparse_is_restored_after_a_delegated_command(capsys):
    import argparse

    original = argparse.ArgumentParser.error
    main(["demo", "--epochs", "x"])
    main(["sweep", "--help"])
    capsys.readouterr()
    assert argparse.ArgumentParser.error is original


def test_accounting_cli_docstring_examples_run():
    result = doctest.testmod(accounting.cli, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_the_cli_imports_no_folder_outside_the_installed_packages():
    """epsilon, noise, sweep and audit run without touching benchmarks/ or tutorials/ (demo and bench import them)."""
    code = (
        "import sys\n"
        "from dp_microclip.cli import main\n"
        "assert main(['epsilon', '--sample-rate', '0.01', '--noise-multiplier', '1', '--steps', '10',"
        " '--delta', '1e-5', '--accountant', 'rdp']) == 0\n"
        "assert main(['sweep', '--help']) == 0 and main(['audit', '--help']) == 0\n"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'benchmarks', 'tutorials'}\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not os.path.exists(EXE), reason="the dp-microclip executable is not installed in this environment")
def test_installed_executable(tmp_path):
    proc = subprocess.run([EXE, "noise", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5",
                           "--target-epsilon", "1", "--accountant", "rdp", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["noise_multiplier"] > 0
    proc = subprocess.run([EXE, "epsilon", "--sample-rate", "2", "--noise-multiplier", "1", "--steps", "10",
                           "--delta", "1e-5"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dp-microclip epsilon: error: --sample-rate")


# ====================================================================== what a newcomer meets first (issue 29)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parsers_of(command: str) -> list[argparse.ArgumentParser]:
    """The argument parsers a command builds (its sub-parsers included), caught as it starts to parse."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def catch(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    command_main = cli._load(command)
    assert callable(command_main), command_main
    argparse.ArgumentParser.parse_known_args = catch
    try:
        try:
            command_main([command] if command in ("epsilon", "noise") else [])
        except SystemExit:  # accounting.cli's main catches it and returns 0
            pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
    assert parsers, f"{command} parsed no arguments"
    for parser in list(parsers):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return parsers


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_says_its_default(command):
    missing = []
    for parser in _parsers_of(command):
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            if not text:
                missing.append(f"{action.option_strings[-1]}: no help text")
            elif action.default not in (None, False) and "default" not in text:
                missing.append(f"{action.option_strings[-1]}: the default {action.default!r} is not stated")
    assert not missing, missing


def test_demo_help_lists_every_option_with_its_default(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag, default in [("--micro-batch-size", "8"), ("--max-grad-norm", "1.0"), ("--clipping", "fixed"),
                          ("--batch-size", "64"), ("--epochs", "30"), ("--lr-plain", "0.02"), ("--lr-clip", "0.05"),
                          ("--label-noise", "0.2"), ("--seed", "0")]:
        assert flag in out
        block = out.split(flag, 2)[-1].split("\n  --", 1)[0]  # the option's own help, after the usage line
        assert re.search(rf"default\s+{re.escape(default)}\)", block), (flag, block)


# argv, flags the message must name, Python names it must not contain
FLAG_ERRORS = [
    (["epsilon", *RUN, "--noise-multiplier", "-1"], ["--noise-multiplier"], ["noise_multiplier", "None"]),
    (["epsilon", *RUN[:-2], "--noise-multiplier", "1", "--adjacency", "replace_one"],
     ["--accountant pld", "--adjacency replace_one"], ['accountant="', 'adjacency="']),
    (["epsilon", "--sample-rate", "2", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
     ["--sample-rate", "--batch-size / --dataset-size"], ["sample_rate", "expected_batch_size"]),
    (["epsilon", *RUN, "--noise-multiplier", "1", "--micro-batch-size", "0"], ["--micro-batch-size"],
     ["micro_batch_size"]),
    (["noise", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5", "--accountant", "rdp",
      "--target-epsilon", "1e-9"], ["--target-epsilon"], ["target_epsilon"]),
    (["audit", "--noise-multiplier", "-1"], ["--noise-multiplier", "--no-noise"], ["noise_multiplier", "noise=False"]),
    (["audit", "--canary", "input", "--k-pos", "10000"], ["--k-pos", "--canaries"], ["k_pos", "num_canaries"]),
    (["audit", "--micro-batch-size", "0"], ["--micro-batch-size"], ["micro_batch_size"]),
    (["demo", "--epochs", "1", "--micro-batch-size", "0"], ["--micro-batch-size"], ["micro_batch_size"]),
]


@pytest.mark.parametrize("argv, flags, python_names", FLAG_ERRORS, ids=lambda v: " ".join(v[:4]) if isinstance(v, list) and v and v[0] in COMMANDS else None)
def test_errors_name_the_flags_the_user_typed(argv, flags, python_names, capsys):
    if argv[0] == "demo":
        pytest.importorskip("sklearn")
    assert main(argv) == 2
    if argv[0] == "demo":  # the plain run trains (one epoch, its progress bar on stderr) before attach() refuses
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in err, err
        line = errors[0]
    else:
        line = _one_error_line(capsys, argv[0])
    for flag in flags:
        assert flag in line, (flag, line)
    for name in python_names:
        assert name not in line, (name, line)


@pytest.mark.parametrize(
    "argv",
    [
        ["epsilon", *RUN, "--noise-multiplier", "1", "--unknown-flag", "--json"],  # argparse
        ["epsilon", *RUN, "--noise-multiplier", "-1", "--json"],  # the library refuses
        ["noise", *RUN, "--json"],  # no --target-epsilon
        ["audit", "--canaries", "x", "--json"],  # argparse, inside a delegated command
        ["audit", "--noise-multiplier", "-1", "--json"],  # the library refuses, printed by audit itself
        ["frobnicate", "--json"],  # unknown command
    ],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_json_errors_are_one_json_object_with_exit_status_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout holds exactly one JSON object
    command = argv[0] if argv[0] in COMMANDS else None
    assert data["exit_code"] == 2 and data["command"] == command
    assert data["error"] and "Traceback" not in data["error"]
    assert captured.err.strip().endswith(data["error"])  # the same message, one line, on stderr
    assert "_" not in re.sub(r"(dp_accounting|add_remove|replace_one|[\w./-]+\.py)", "", data["error"].split(" (see")[0])


def test_audit_without_noise_json_has_numbers_or_null(capsys):
    assert main(["audit", *TINY_AUDIT, "--no-noise", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"inf"' not in out and "Infinity" not in out and "NaN" not in out
    data = json.loads(out)
    assert data["claimed_epsilon"] is None
    assert isinstance(data["lower_bound"], (int, float)) and isinstance(data["steps"], int)
    assert all(not isinstance(v, str) or k in ("canary", "score", "accountant") for k, v in data.items()), data


class _NoRule(torch.nn.Module):
    """A module with a parameter, no layer rule and a use the usage route does not take (``exp``): its first
    forward warns that it takes the generic path."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return x * self.scale.exp()


def test_engine_warnings_point_at_the_users_line():
    import dp_microclip

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _NoRule())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dp_microclip.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        model(torch.randn(2, 3))
    engine.detach()
    generic = [w for w in caught if "generic" in str(w.message)]
    assert generic, [str(w.message) for w in caught]
    assert all((w.filename, w.lineno) == (__file__, line) for w in generic), [(w.filename, w.lineno) for w in generic]


def _where(caught, text):
    found = [(w.filename, w.lineno) for w in caught if text in str(w.message)]
    assert found, [str(w.message) for w in caught]
    return found


def test_training_warnings_point_at_the_users_line():
    """Warnings raised inside the engine's hooks (through torch's forward, backward and optimizer wrappers)
    and by its DP checks name the user's forward, step, attach and data_loader lines, never a library file."""
    import dp_microclip
    from torch.utils.data import TensorDataset

    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = torch.nn.Linear(3, 2)  # (a model that runs on one batch size only is refused: test_probe_layouts)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = dp_microclip.attach(model, optimizer, micro_batch_size=2, max_grad_norm=1.0, clipping="adaptive")
        out = model(x)
        (out * 0.0).sum().backward()                     # every micro-batch gradient is 0
        step = sys._getframe().f_lineno + 1
        optimizer.step()                                 # adaptive bound rho = 0: a warning
        engine.detach()
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        attach = sys._getframe().f_lineno + 1
        engine = dp_microclip.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0, seed=0,
                                     privacy=dp_microclip.DP(noise_multiplier=1.0, delta=0.5, sample_rate=0.5))
        loader = sys._getframe().f_lineno + 1
        engine.data_loader(TensorDataset(x, y))          # delta >= 1/N: a warning
        engine.detach()
    assert set(_where(caught, "rho is 0")) == {(__file__, step)}
    assert set(_where(caught, "seed=0")) == {(__file__, attach)}
    assert set(_where(caught, "at least 1/N")) == {(__file__, loader)}


def test_demo_and_bench_run_from_the_checkout_of_an_editable_install(tmp_path):
    """tutorials/ and benchmarks/ are not installed: the command finds them next to the package's checkout."""
    site = tmp_path / "site"
    site.mkdir()
    for package in ("dp_microclip", "accounting"):  # an install that maps only the two packages, as the wheel does
        (site / package).symlink_to(ROOT / package)
    code = ("import sys\n"
            "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
            "from dp_microclip.cli import main\n"
            "assert main(['demo', '--help']) == 0 and main(['bench', '--help']) == 0\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--label-noise" in proc.stdout and "--rounds" in proc.stdout and "not available" not in proc.stdout


def test_version_agrees_with_pyproject_and_the_changelog():
    import tomllib

    import dp_microclip

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert dp_microclip.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.M), f"CHANGELOG.md has no section for {version}"
