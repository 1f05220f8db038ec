"""The benchmark commands run end to end on tiny shapes and check every method against the naive loop.

Timings are not asserted (they belong in benchmarks/results, not in unit tests);
what is asserted is that each harness runs, writes its tables, and that no
method was marked WRONG (or MISMATCH) by its gradient check. Each test takes
well under 30 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess

from dp_microclip.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        assert "Timed: the user's whole step" in text  # the default timing measures what users run
        data = json.loads(tables[0].with_suffix(".json").read_text())
        assert data["settings"]["timing"] == "user"


def test_interleaved_user_timing_never_frees_outside_the_clock():
    """--timing user: no release() (gradients freed outside the clock) and no gc.collect() between steps."""
    import gc

    from benchmarks.measure import interleaved

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name
            self.work = type("W", (), {"device": __import__("torch").device("cpu")})()

        def step(self):
            calls.append(("step", self.name))

        def release(self):
            calls.append(("release", self.name))

    collected = []
    gc.callbacks.append(lambda phase, info: collected.append(info.get("generation")) if phase == "start" else None)
    try:
        gc.collect()
        collected.clear()
        plain_t, out = interleaved(Fake("plain"), {"m": Fake("m")}, rounds=3, warmup=1, slow_ms=1e9, slow_rounds=3)
    finally:
        gc.callbacks.pop()
    assert not any(kind == "release" for kind, _ in calls)
    assert 2 not in collected  # no full collection forced by the harness (automatic young ones may happen)
    assert len(out["m"].ratios) == 3 and len(plain_t.ms) == 3
    calls.clear()
    interleaved(Fake("plain"), {"m": Fake("m")}, rounds=1, warmup=0, slow_ms=1e9, slow_rounds=1, mode="isolated")
    assert ("release", "m") in calls and ("release", "plain") in calls


def test_dp_loop_quick_runs_each_method_in_a_fresh_process(tmp_path):
    from benchmarks import dp_loop

    code = dp_loop.main(["--quick", "--methods", "engine,engine_loss,plain,opacus_ghost", "--b", "1",
                         "--out", str(tmp_path), "--machine", "smoke"])
    assert code == 0
    md = (tmp_path / "quick" / "smoke-dp-loop.md").read_text()
    data = json.loads((tmp_path / "quick" / "smoke-dp-loop.json").read_text())
    by_method = {s["method"]: s for s in data["summaries"]}
    assert set(by_method) == {"engine", "engine_loss", "plain", "opacus_ghost"}
    for s in by_method.values():
        assert s["ok_runs"] == 1, (s["label"], s["errors"])
        assert s["wall_s"] > s["startup_s"] > 0 and s["steps"] >= 1
        assert 0.0 <= s["accuracy"] <= 1.0
    # the engine spends (about) its target; plain trains on exactly the engine's Poisson batches
    assert 7.0 < by_method["engine"]["epsilon"] <= 8.0 + 1e-6
    assert by_method["engine"]["checksums"] == by_method["plain"]["checksums"]
    assert by_method["engine_loss"]["checksums"] == by_method["engine"]["checksums"]
    assert "same batches" in md and "DIFFER" not in md and "| failed |" not in md


def test_gpu_module_cpu_path_checks_rules_and_writes_every_file(tmp_path):
    from benchmarks import gpu

    code = gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--cases", "linear,groupnorm,batchnorm1d",
                     "--modes", "auto", "--models", "mlp"])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu-bench.json", "gpu-bench.md", "gpu-correctness.json", "gpu-correctness.md",
                     "gpu-env.json", "gpu-summary.md"]
    env = json.loads((tmp_path / "gpu-env.json").read_text())
    assert env["torch"] and "Linear" in env["registered_types"]
    res = json.loads((tmp_path / "gpu-correctness.json").read_text())
    rows = res["rows"]
    assert {r["case"] for r in rows} == {"linear", "groupnorm", "batchnorm1d"}
    core = [r for r in rows if r["precision"] == "fp32" and r["case"] in ("linear", "groupnorm")]
    assert core and all(r["status"] == "ok" for r in core), [(r["case"], r.get("error")) for r in core]
    # every other row (bf16 autocast; BatchNorm at b = B) is right or a recorded refusal, never a silent mismatch
    assert all(r["status"] in ("ok", "error") for r in rows), [r for r in rows if r["status"] == "MISMATCH"]
    assert all(r.get("error") for r in rows if r["status"] == "error")
    bench = json.loads((tmp_path / "gpu-bench.json").read_text())
    mlp = bench["models"]["mlp"]
    assert "error" not in mlp, mlp
    assert all(r["status"] != "wrong" for r in mlp["rows"])
    assert {(r["kind"], r["b"]) for r in mlp["rows"]} >= {("plain", None), ("engine", 1), ("engine", 8)}


def test_gpu_sh_is_valid_bash_and_documents_its_usage():
    script = os.path.join(ROOT, "benchmarks", "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--device cpu --quick" in out.stdout


def test_memory_benchmark_writes_its_table_with_every_method(tmp_path):
    from benchmarks.memory import main as memory_main

    memory_main(["--models", "mlp", "--no-rss", "--out", str(tmp_path)])
    text = (tmp_path / "cpu-memory.md").read_text()
    for method in ("plain PyTorch", "engine default", "engine lean", "Opacus ghost"):
        assert f"| mlp | {method} |" in text, method
    assert "python -m benchmarks.memory --models mlp" in text  # the command that made it
    rows = json.loads((tmp_path / "cpu-memory.json").read_text())["rows"]
    assert all(r["allocated_mb"] is not None for r in rows), rows


def test_realsize_tiny_cpu_smoke_writes_its_table(tmp_path):
    """benchmarks/realsize.py (GPT-2 small / LLaMA-160M on a GPU) in its tiny CPU configuration: every method
    asked for runs and lands in the table with a ratio to plain."""
    from benchmarks import realsize

    code = realsize.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--json", "--models", "gpt2-124m",
                          "--methods", "plain", "engine b=1", "engine b=8", "DP b=8"])
    assert code == 0
    text = (tmp_path / "realsize.md").read_text()
    assert "| gpt2-124m |" in text and "| engine b=8 |" in text
    rows = json.loads((tmp_path / "realsize.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["plain", "engine b=1", "engine b=8", "DP b=8"]
    assert all("error" not in r and r["ratio"] > 0 for r in rows), rows


def test_floor_benchmark_checks_its_hand_written_clipping_against_the_naive_loop(capsys):
    """The hand-written floor is exact at b=1 and b=8 (main returns 1 when it is not) and the line is printed."""
    from benchmarks import floor

    assert floor.main(["--rounds", "2", "--b", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "b=1:" in out and "b=8:" in out and "engine - floor" in out


def test_cuda_counts_classify_only_the_calls_inside_the_counted_steps():
    """The GPU run's kernel/sync count: runtime calls are classified by name, only inside the step marks (the
    profiler's own synchronisation when it stops is left out), averaged per step; the table shows x plain."""
    from types import SimpleNamespace

    from benchmarks import cuda_counts, gpu

    def ev(name, start, end=None):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=start if end is None else end))

    events = [ev(cuda_counts.STEP_MARK, 0, 100), ev("cudaLaunchKernel", 5), ev("cuLaunchKernel", 6),
              ev("cudaStreamSynchronize", 7), ev("cudaMemcpyAsync", 8), ev("aten::mm", 9),
              ev(cuda_counts.STEP_MARK, 200, 300), ev("cudaLaunchKernel", 250),
              ev("cudaDeviceSynchronize", 400)]  # after the last step: the profiler's own
    counts = cuda_counts.classify(cuda_counts.inside_steps(events), steps=2)
    assert counts == cuda_counts.StepCounts(kernels=1.5, syncs=0.5, copies=0.5)
    table = gpu.render_cuda_counts({"plain PyTorch": {"kernels": 30.0, "syncs": 0.0, "copies": 0.0},
                                    "dp_microclip auto b=1": {"kernels": 45.0, "syncs": 0.0, "copies": 0.0},
                                    "Opacus ghost": {"error": "boom"}})
    assert "| dp_microclip auto b=1 | 45 | 1.50x | 0.0 | 0.0 |" in table and "failed: boom" in table


def test_cuda_counts_step_marks_are_real_profiler_ranges_and_cpu_is_refused():
    """On the CPU the profiler's record_function ranges hold the step's own ops (what inside_steps relies on);
    counting CUDA calls on a CPU device is refused."""
    import pytest
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import cuda_counts

    x = torch.randn(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with torch.profiler.record_function(cuda_counts.STEP_MARK):
                x @ x
        x + x  # outside the marks
    names = cuda_counts.inside_steps(list(prof.events()))
    assert names.count("aten::mm") == 2 and "aten::add" not in names
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_counts.count_step(lambda: None, torch.device("cpu"))
