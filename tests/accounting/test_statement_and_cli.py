"""The privacy statement, the CLI, and importing accounting without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from accounting import Ledger, Mechanism, privacy_statement
from accounting.cli import main
from tests.accounting import reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ledger(b=8, z=1.1, steps=100):
    ledger = Ledger()
    ledger.record(Mechanism(sample_rate=0.01, noise_multiplier=z, micro_batch_size=b), steps)
    return ledger


def test_statement_names_adjacency_sampling_grouping_and_micro_batching():
    text = privacy_statement(_ledger(), 1e-5, accountant="rdp", dataset_size=10000)
    assert "add/remove-one" in text
    assert "Poisson sampling" in text and "performed by the engine's loader" in text
    assert "keyed groups" in text and "b=8" in text
    assert "sensitivity 2C" in text and "z/2 = 0.55" in text
    assert "per-example losses" in text  # the loss assumption is stated, not silent
    assert "Dataset: 10000 examples; 1 epochs in expectation" in text  # 100 steps at q = 0.01
    eps = _ledger().epsilon(1e-5, "rdp")
    assert text.splitlines()[-1] == f"Epsilon: {eps:.4g} at delta = 1e-05."


def test_statement_for_b1_says_per_example():
    text = privacy_statement(_ledger(b=1), 1e-5, accountant="rdp")
    assert "per-example clipping" in text and "sensitivity C" in text


def test_statement_says_when_the_sampling_is_only_declared():
    text = privacy_statement(_ledger(), 1e-5, accountant="rdp", sampling_declared_by_user=True)
    assert "Declared by the user" in text


def test_statement_after_a_noise_free_step_says_infinite_and_where():
    ledger = _ledger(steps=10)
    ledger.record(Mechanism(sample_rate=0.01, noise_multiplier=None, micro_batch_size=8))
    text = privacy_statement(ledger, 1e-5, accountant="rdp")
    assert "Step 11" in text and "without noise" in text
    assert text.splitlines()[-1] == "Epsilon: inf at delta = 1e-05."


def test_cli_epsilon_matches_dp_accounting(capsys):
    code = main(["epsilon", "--batch-size", "256", "--dataset-size", "60000", "--noise-multiplier", "1.1",
                 "--steps", "14062", "--delta", "1e-5", "--micro-batch-size", "8", "--accountant", "pld"])
    out = capsys.readouterr().out
    assert code == 0
    first = out.splitlines()[0]
    eps = float(first.split("=")[1].split()[0])
    assert eps == pytest.approx(reference.pld_epsilon([(0.55, 256 / 60000, 14062)], 1e-5), rel=0.01)
    assert "DP-SGD privacy statement" in out and "Declared by the user" in out


def test_cli_epochs_are_the_loaders_epochs(capsys):
    # One definition (accounting.epochs): an epoch is round(1/q) steps, as engine.data_loader yields them;
    # a fractional number of epochs rounds up.
    from accounting.epochs import steps_for_epochs

    assert main(["epsilon", "--sample-rate", "0.3", "--noise-multiplier", "2", "--epochs", "1", "--delta", "1e-5",
                 "--accountant", "rdp"]) == 0
    assert "(3 steps" in capsys.readouterr().out  # round(1 / 0.3)
    assert main(["epsilon", "--sample-rate", "0.3", "--noise-multiplier", "2", "--epochs", "1.5", "--delta", "1e-5",
                 "--accountant", "rdp"]) == 0
    assert "(5 steps" in capsys.readouterr().out  # ceil(1.5 * 3)
    assert steps_for_epochs(60, 256 / 60000) == 14040  # the privacy plan of attach(..., privacy=DP(epochs=60)) agrees


def test_cli_noise_round_trips(capsys):
    assert main(["noise", "--sample-rate", "0.01", "--steps", "1000", "--target-epsilon", "2", "--delta", "1e-5",
                 "--micro-batch-size", "4", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    z = float(out.splitlines()[0].split("=")[1])
    ledger = Ledger()
    ledger.record(Mechanism(sample_rate=0.01, noise_multiplier=z, micro_batch_size=4), 1000)
    assert 1.98 <= ledger.epsilon(1e-5, "rdp") <= 2.0


@pytest.mark.parametrize(
    "argv, match",
    [
        (["epsilon", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "Give --sample-rate"),
        (["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--delta", "1e-5"], "exactly one of --steps"),
        (["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5",
          "--adjacency", "replace_one", "--accountant", "rdp"], "--accountant pld"),
        (["epsilon", "--sample-rate", "2", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
         "--sample-rate must be in"),
        (["noise", "--sample-rate", "0.01", "--steps", "10", "--delta", "3", "--target-epsilon", "1"],
         "--delta must be in"),
    ],
)
def test_cli_errors_exit_2_and_say_why(argv, match, capsys):
    assert main(argv) == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_accounting_and_compute_without_torch():
    code = (
        "import sys, accounting\n"
        "assert 'torch' not in sys.modules, 'import accounting loaded torch'\n"
        "l = accounting.Ledger(); l.record(accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0), 100)\n"
        "print(l.epsilon(1e-5, 'pld'), l.epsilon(1e-5, 'rdp_google'))\n"
        "print(accounting.privacy_statement(l, 1e-5, accountant='pld').splitlines()[-1])\n"
        "assert 'torch' not in sys.modules, 'the dp_accounting backends loaded torch'\n"
        "import accounting.audit\n"
        "print(accounting.audit.audit_lower_bound([1.0, 0.0] * 50, [True, False] * 50, 10, 10, delta=1e-5))\n"
        "assert 'torch' not in sys.modules, 'the audit statistics loaded torch'\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "Epsilon:" in proc.stdout


def test_installed_command_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "dp-microclip")
    proc = subprocess.run([exe, "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "100",
                           "--delta", "1e-5", "--accountant", "rdp"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("epsilon = ")
    proc = _run("", "-m", "accounting", "noise", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5",
                "--target-epsilon", "1", "--accountant", "rdp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("noise_multiplier = ")
