"""The benchmark command runs end to end on tiny shapes and checks every method against the naive loop.

Timings are not asserted (they belong in benchmarks/results, not in unit tests);
what is asserted is that the harness runs, writes its tables, and that no
method was marked WRONG by its gradient check.
"""

from __future__ import annotations

from dp_microclip.cli import main


def test_bench_quick_run_writes_tables_and_finds_no_wrong_gradient(tmp_path):
    code = main(["bench", "--quick", "--models", "mlp,cnn,transformer", "--b", "1,4", "--batch-size", "8",
                 "--seq-len", "8", "--rounds", "1", "--out", str(tmp_path)])
    assert code == 0
    for model in ("mlp", "cnn", "transformer"):
        tables = list((tmp_path / "quick").glob(f"*-{model}.md"))
        assert len(tables) == 1, model
        text = tables[0].read_text()
        assert "| plain PyTorch |" in text and "| dp_microclip auto | 1 |" in text
        assert "WRONG" not in text
        assert " ok |" in text  # at least one method passed its gradient check
