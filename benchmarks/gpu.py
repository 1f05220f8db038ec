"""``python -m benchmarks.gpu``: the GPU run, correctness on the device then the benchmark table.

Called by ``benchmarks/gpu.sh`` (which checks the machine, installs carried
wheels and applies a hard timeout per section); runs on CPU too
(``--device cpu --quick``: the smoke path CI tests).

Sections (``--sections``, default all three):

* ``env``: versions, device, what is missing (``gpu-env.json``).
* ``correctness``: for every layer rule ``dp_microclip.registered_types()`` lists,
  plus attention, a TransformerEncoder, a module with no rule (generic path) and
  three whole models, the engine's averaged clipped gradient ON THE DEVICE is
  compared with the naive loop (``dp_microclip.reference``, one backward per
  micro-batch) computed in float64 on the same device, for every ``grad_mode``
  and b in {1, 2} (BatchNorm: b = B, where the naive loop's statistics are the
  engine's), in float32 and under ``torch.autocast(bfloat16)``. The naive loop in
  the same precision is the yardstick: ``engine err`` vs ``naive err`` (both
  relative to float64). A case that raises is recorded with its error text and
  the run goes on (``gpu-correctness.md/.json``).
* ``bench``: the benchmark table (``benchmarks/bench.py``'s harness: each method
  checked against the naive loop, then interleaved paired timing of the user's
  whole step, device-synchronised) for the MLP, CNN and transformer of
  ``benchmarks/models.py`` and, if ``transformers`` imports, BERT, GPT-2 and LLaMA
  at d=256, 4 layers, T=128, B=32; methods plain, the engine (auto) at b in
  {1, 8, 32} and Opacus ghost (b=1) where it runs; extra peak memory per method
  (CUDA: ``torch.cuda.max_memory_allocated`` over two steps, in this process)
  (``gpu-bench.md/.json``).

TF32 is switched off (``allow_tf32 = False`` for matmul and cuDNN) so float32 is
float32 for every method, plain included. Everything goes to ``--out`` (at most
7 files: the device tool brings back 8); each section rewrites its files after
every case, so a killed section leaves what it finished. No single failing case
stops a section; each section stops starting new cases when ``--budget-s`` runs out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings

DEFAULT_BUDGET = {"env": 60.0, "correctness": 150.0, "bench": 300.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_json(path, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
    os.replace(tmp, path)


def _write_text(path, text) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ============================================================================ env
def env_info(device_name: str) -> dict:
    info: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
                  "executable": sys.executable, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "requested_device": device_name, "missing": []}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
        elif device_name.startswith("cuda"):
            info["missing"].append("CUDA: torch.cuda.is_available() is False")
    except Exception as err:  # noqa: BLE001
        info["torch"] = None
        info["missing"].append(f"torch ({_short(err)})")
    for mod, why in (("numpy", "required"), ("scipy", "required (accounting)"),
                     ("opacus", "optional: Opacus rows and the PRV accountant"),
                     ("transformers", "optional: BERT / GPT-2 / LLaMA rows"),
                     ("sklearn", "optional: dp_loop's data"), ("matplotlib", "optional: plots")):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as err:  # noqa: BLE001
            info[mod] = None
            info["missing"].append(f"{mod} ({why}): {_short(err, 120)}")
    try:
        import dp_microclip

        info["dp_microclip"] = dp_microclip.__version__
        info["dp_microclip_path"] = os.path.dirname(dp_microclip.__file__)
        info["registered_types"] = [t.__name__ for t in dp_microclip.registered_types()]
    except Exception as err:  # noqa: BLE001
        info["dp_microclip"] = None
        info["missing"].append(f"dp_microclip ({_short(err)})")
    try:
        from .bench import git_commit

        info["commit"] = git_commit()
    except Exception:  # noqa: BLE001
        info["commit"] = "unknown"
    return info


# ============================================================================ correctness
def _cases(batch: int):
    """name -> (model factory, inputs factory, micro-batch sizes or None for the default)."""
    import torch
    from torch import nn

    class MeanOver(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return x.mean(self.dim)

    class Scale(nn.Module):  # no rule: the generic torch.func path
        def __init__(self, n):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x):
            return torch.tanh(x * self.w)

    class SelfAttention(nn.Module):
        def __init__(self, d=8, heads=2):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    class BilinearBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = nn.Bilinear(3, 4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.bil(x[:, :3], x[:, 3:])))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(13, 16)
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, tokens):
            return self.head(self.encoder(self.embed(tokens)).mean(1))

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return lambda: torch.randn(*shape, generator=g)

    def tokens(vocab, t):
        return lambda: torch.randint(0, vocab, (batch, t), generator=g)

    def cls(n_in):
        return [nn.Flatten(), nn.Linear(n_in, 3)]

    Seq = nn.Sequential
    full = [batch]
    from .models import CNN, MLP, TransformerClassifier

    return {
        "linear": (lambda: Seq(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), randn(batch, 6), None),
        "linear_seq": (lambda: Seq(nn.Linear(6, 5), nn.ReLU(), MeanOver(1), nn.Linear(5, 3)), randn(batch, 4, 6), None),
        "conv1d": (lambda: Seq(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), *cls(40)), randn(batch, 3, 10), None),
        "conv2d": (lambda: Seq(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
                               nn.Conv2d(4, 4, 3, groups=2, padding="same", padding_mode="reflect"), *cls(64)),
                   randn(batch, 2, 7, 7), None),
        "conv3d": (lambda: Seq(nn.Conv3d(2, 3, 3, padding=1), nn.Tanh(), *cls(3 * 4 * 4 * 4)),
                   randn(batch, 2, 4, 4, 4), None),
        "convtranspose1d": (lambda: Seq(nn.ConvTranspose1d(3, 4, 3, stride=2), nn.Tanh(), *cls(4 * 21)),
                            randn(batch, 3, 10), None),
        "convtranspose2d": (lambda: Seq(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
                                        nn.Tanh(), *cls(4 * 10 * 10)), randn(batch, 2, 5, 5), None),
        "convtranspose3d": (lambda: Seq(nn.ConvTranspose3d(2, 2, 3), nn.Tanh(), *cls(2 * 5 * 5 * 5)),
                            randn(batch, 2, 3, 3, 3), None),
        "prelu": (lambda: Seq(nn.Linear(6, 6), nn.PReLU(6), nn.Linear(6, 5), nn.PReLU(), nn.Linear(5, 3)),
                  randn(batch, 6), None),
        "bilinear": (BilinearBlock, randn(batch, 7), None),
        "embedding": (lambda: Seq(nn.Embedding(11, 5, padding_idx=0), MeanOver(1), nn.Linear(5, 3)), tokens(11, 6), None),
        "layernorm": (lambda: Seq(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)), randn(batch, 6), None),
        "groupnorm": (lambda: Seq(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), *cls(36)), randn(batch, 2, 5, 5), None),
        "rmsnorm": (lambda: Seq(nn.Linear(6, 6), nn.RMSNorm(6), nn.Linear(6, 3)), randn(batch, 6), None),
        "batchnorm1d": (lambda: Seq(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), randn(batch, 6), full),
        "batchnorm2d": (lambda: Seq(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), *cls(36)), randn(batch, 2, 5, 5), full),
        "batchnorm3d": (lambda: Seq(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), *cls(24)), randn(batch, 2, 4, 4, 4), full),
        "mha": (lambda: Seq(SelfAttention(8, 2), MeanOver(1), nn.Linear(8, 3)), randn(batch, 5, 8), None),
        "transformer_encoder": (Encoder, tokens(13, 6), None),
        "generic": (lambda: Seq(nn.Linear(6, 5), Scale(5), nn.Linear(5, 3)), randn(batch, 6), None),
        "model_mlp": (MLP, randn(batch, 1, 28, 28), None),
        "model_cnn": (CNN, randn(batch, 1, 28, 28), None),
        "model_transformer": (lambda: TransformerClassifier(d=32, heads=2, ff=64), tokens(1000, 8), None),
        **_hf_cases(batch),
    }


def _hf_cases(batch: int) -> dict:
    """Tiny Hugging Face models (when ``transformers`` imports): their Conv1D / RMSNorm rules, LM targets."""
    from .models import HF_TINY, build_model, hf_available

    if not hf_available():
        return {}
    out = {}
    for name in HF_TINY:
        out[f"hf_{name}"] = (lambda n=name: build_model(n), _hf_batch(name, batch, "inputs"), None,
                             _hf_batch(name, batch, "targets"))
    return out


def _hf_batch(name: str, batch: int, what: str):
    def make():
        import torch

        from .models import make_workload

        torch.manual_seed(0)
        return getattr(make_workload(name, "cpu", batch, None, seed=0), what)

    return make


def _classes(model, x):
    import torch

    with torch.no_grad():
        return model(x).shape[-1]


def _floored_errors(got: dict, want: dict) -> tuple[float, str, float]:
    """Worst relative error per parameter tensor, floored as in benchmarks/methods.py; plus the worst raw one."""
    from .methods import relative_error

    total = math.sqrt(sum(float(w.double().pow(2).sum()) for w in want.values()))
    numel = sum(w.numel() for w in want.values())
    worst, worst_raw = (-1.0, ""), -1.0
    for name, ref in want.items():
        g = got.get(name)
        g = None if g is None else g.double()
        worst = max(worst, (relative_error(g, ref, total * math.sqrt(ref.numel() / numel)), name))
        worst_raw = max(worst_raw, relative_error(g, ref))
    return worst[0], worst[1], worst_raw


def _group_norms(model, loss_fn, x, y, b):
    """Norms of each contiguous micro-batch's mean gradient (float64 model): to set C near their median."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for j in range(x.shape[0] // b):
        loss = loss_fn(model(x[j * b:(j + 1) * b]), y[j * b:(j + 1) * b])
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(math.sqrt(sum(float(gi.pow(2).sum()) for gi in gs if gi is not None)))
    return norms


def run_correctness(args, device, out_dir, deadline) -> dict:
    import copy
    import statistics

    import torch
    import torch.nn.functional as F

    import dp_microclip
    from dp_microclip.reference import naive_microbatch_grads

    batch = 8
    cases = _cases(batch)
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases}
    modes = args.modes or ["auto", "bookkeeping", "materialize", "func"]
    precisions = args.precisions or ["fp32", "bf16"]
    registered = list(dp_microclip.registered_types())
    result = {"device": str(device), "batch": batch, "modes": modes, "precisions": precisions, "rows": [],
              "coverage": {}, "skipped": []}
    json_path = os.path.join(out_dir, "gpu-correctness.json")
    md_path = os.path.join(out_dir, "gpu-correctness.md")

    def loss_fn(out, y):
        return F.cross_entropy(out, y)

    def autocast(precision):
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)

    t_start = time.perf_counter()
    for name, (factory, make_x, bs, *make_y) in cases.items():
        if time.perf_counter() > deadline:
            result["skipped"].append(name)
            continue
        t_case = time.perf_counter()
        try:
            torch.manual_seed(0)
            template = factory()
            state = copy.deepcopy(template.state_dict())
            x_cpu = make_x()
            if make_y:  # the case brings its own targets (language models: (B, T) tokens)
                y_cpu = make_y[0]()
            else:
                classes = _classes(template, x_cpu)
                y_cpu = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(1))
            covered = sorted({type(m).__name__ for m in template.modules() if type(m) in registered})
            for t in covered:
                result["coverage"].setdefault(t, []).append(name)
        except Exception as err:  # noqa: BLE001
            result["rows"].append({"case": name, "status": "error", "error": "building the case: " + _short(err)})
            continue

        def fresh(dtype=torch.float32):
            m = factory()
            m.load_state_dict(state)
            return m.to(device=device, dtype=dtype).train()

        x = x_cpu.to(device)
        x64 = x.double() if x.is_floating_point() else x
        y = y_cpu.to(device)
        for b in bs or [1, 2]:
            try:  # float64 reference on the device, and a bound near the median micro-batch norm
                ref_model = fresh(torch.float64)
                norms = _group_norms(ref_model, loss_fn, x64, y, b)
                bound = float(statistics.median(norms)) or 1.0
                want = naive_microbatch_grads(ref_model, loss_fn, x64, y, micro_batch_size=b, max_grad_norm=bound)
                clipped = sum(n > bound for n in norms) / len(norms)
            except Exception as err:  # noqa: BLE001
                result["rows"].append({"case": name, "b": b, "status": "error",
                                       "error": "float64 reference: " + _short(err)})
                continue
            for precision in precisions:
                try:  # the naive loop in this precision: how far rounding alone moves the answer
                    naive_model = fresh()
                    with autocast(precision):
                        naive = naive_microbatch_grads(naive_model, loss_fn, x, y, micro_batch_size=b,
                                                       max_grad_norm=bound)
                    naive_err = _floored_errors(naive, want)[0]
                except Exception as err:  # noqa: BLE001
                    naive_err, naive_fail = None, _short(err)
                else:
                    naive_fail = None
                for mode in modes:
                    row = {"case": name, "b": b, "precision": precision, "mode": mode, "bound": bound,
                           "clipped": clipped, "naive_err": naive_err}
                    if naive_fail:
                        row["naive_error"] = naive_fail
                    try:
                        model = fresh()
                        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
                        opt = torch.optim.SGD(model.parameters(), lr=0.0)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=bound,
                                                         grad_mode=mode)
                            try:
                                opt.zero_grad()
                                with autocast(precision):
                                    loss = loss_fn(model(x), y)
                                loss.backward()
                                opt.step()
                                if device.type == "cuda":
                                    torch.cuda.synchronize(device)
                                params = dict(model.named_parameters())
                                got = {n: params[n].grad for n in trainable}
                                row["strategies"] = ", ".join(sorted(set(map(str, engine.last_strategies.values()))))
                            finally:
                                engine.detach()
                        err, pname, raw = _floored_errors(got, want)
                        row.update(err=err, param=pname, raw_err=raw)
                        row["status"] = _verdict(precision, err, naive_err)
                    except Exception as err:  # noqa: BLE001 (a failing case is a result)
                        row.update(status="error", error=_short(err, 500),
                                   where=traceback.format_exc(limit=-2).strip().splitlines()[-3:])
                    result["rows"].append(row)
        log(f"  [correctness] {name}: {time.perf_counter() - t_case:.1f} s")
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_json(json_path, result)
        _write_text(md_path, render_correctness(result))
    result["missing_types"] = [t.__name__ for t in registered if t.__name__ not in result["coverage"]]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(json_path, result)
    _write_text(md_path, render_correctness(result))
    return result


FP32_TOL = 1e-4
BF16_TOL = 5e-2


def _verdict(precision: str, err: float, naive_err: float | None) -> str:
    """ok if the engine is within the tolerance of float64, or no worse than 10x the naive loop's own rounding."""
    tol = FP32_TOL if precision == "fp32" else BF16_TOL
    if not math.isfinite(err):
        return "MISMATCH"
    if err <= tol or (naive_err is not None and err <= 10 * naive_err):
        return "ok"
    return "MISMATCH"


def render_correctness(res: dict) -> str:
    rows = res["rows"]
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_err = sum(r.get("status") == "error" for r in rows)
    n_bad = sum(r.get("status") == "MISMATCH" for r in rows)
    lines = [
        f"# dp-microclip on {res['device']}: engine vs the naive loop, every rule",
        "",
        f"Batch {res['batch']}; grad_modes {', '.join(res['modes'])}; precisions {', '.join(res['precisions'])} "
        "(bf16 = `torch.autocast(bfloat16)` around forward and loss). Reference: the naive loop "
        "(`dp_microclip.reference.naive_microbatch_grads`) in float64 on the same device, C = the median "
        "micro-batch norm (about half the micro-batches clipped). `err`: worst relative error per parameter "
        "tensor against float64 (floored as in the benchmark check); `naive err`: the naive loop's own in the "
        f"same precision. ok: err <= {FP32_TOL:g} (fp32) / {BF16_TOL:g} (bf16), or <= 10x naive err. "
        f"TF32 off. {res.get('seconds', 0)} s.",
        "",
        f"**{n_ok} ok, {n_bad} mismatch, {n_err} error** (of {len(rows)}).",
        "",
    ]
    if res.get("missing_types"):
        lines += [f"Registered types with no case here: {', '.join(res['missing_types'])}.", ""]
    if res.get("skipped"):
        lines += [f"Skipped (time budget): {', '.join(res['skipped'])}.", ""]
    cov = res.get("coverage", {})
    if cov:
        lines += ["Coverage: " + "; ".join(f"{t}: {', '.join(c)}" for t, c in sorted(cov.items())) + ".", ""]
    lines += ["| case | b | precision | grad_mode | status | err | naive err | worst param | path / error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "—" if r.get("err") is None else f"{r['err']:.1e}"
        nerr = "—" if r.get("naive_err") is None else f"{r['naive_err']:.1e}"
        note = r.get("error") or r.get("strategies", "")
        if r.get("naive_error"):
            note = f"{note}; naive loop failed: {r['naive_error']}"
        note = " ".join(str(note).replace("|", "/").split())[:300]
        lines.append(f"| {r['case']} | {r.get('b', '—')} | {r.get('precision', '—')} | {r.get('mode', '—')} | "
                     f"{r['status']} | {err} | {nerr} | {r.get('param', '')} | {note} |")
    return "\n".join(lines) + "\n"


# ============================================================================ bench
def bench_models(args) -> list[str]:
    from .models import hf_available

    if args.models:
        return args.models
    base = ["mlp", "cnn", "transformer"]
    hf = ["bert", "gpt2", "llama"] if not args.quick else ["bert_tiny", "gpt2_tiny", "llama_tiny"]
    return base + (hf if hf_available() else [])


@contextlib.contextmanager
def _fresh_runner(spec, work, max_grad_norm):
    """A runner of ``spec`` on its own model copy, closed and its CUDA memory released afterwards."""
    import gc

    import torch

    from .methods import make_runner

    runner = None
    try:
        runner = make_runner(spec, work, max_grad_norm)
        yield runner
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception:  # noqa: BLE001
                pass
        del runner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cuda_extra_memory(work, spec, max_grad_norm, steps=2) -> tuple[float | None, str]:
    """Extra peak memory (MB) of ``steps`` steps on CUDA, in this process: max_memory_allocated - allocated."""
    import gc

    import torch

    try:
        with _fresh_runner(spec, work, max_grad_norm) as runner:
            dev = work.device
            gc.collect()
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(steps):
                runner.step()
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - base) / 2**20, "cuda max_memory_allocated (in process)"
    except Exception as err:  # noqa: BLE001
        return None, _short(err, 160)


def cuda_counts_of(work, rows, max_grad_norm, deadline) -> dict:
    """CUDA kernel launches, host synchronisations and copies per steady-state step of every method that ran
    (``benchmarks/cuda_counts.py``), each on a fresh runner; a method whose count fails gets its error."""
    from .cuda_counts import count_step

    out: dict = {}
    for row in rows:
        if row.status != "ok" or row.spec.kind == "naive" or time.perf_counter() > deadline:
            continue
        label = row.spec.label + (f" b={row.spec.b}" if row.spec.kind == "engine" else "")
        try:
            with _fresh_runner(row.spec, work, max_grad_norm) as runner:
                counts = count_step(runner.step, work.device)
            out[label] = {"kernels": counts.kernels, "syncs": counts.syncs, "copies": counts.copies}
        except Exception as err:  # noqa: BLE001 (a count that fails never stops the run)
            out[label] = {"error": _short(err, 160)}
    return out


def render_cuda_counts(counts: dict) -> str:
    """The per-model table of :func:`cuda_counts_of`: kernels (and their ratio to plain's), syncs, copies."""
    plain = counts.get("plain PyTorch", {}).get("kernels")
    lines = ["CUDA runtime calls per steady-state step (torch.profiler, mean of 3 steps after 2 warm-up steps; "
             "`benchmarks/cuda_counts.py`):", "", "| method | kernel launches | x plain | host syncs | copies |",
             "|---|---|---|---|---|"]
    for label, c in counts.items():
        if "error" in c:
            lines.append(f"| {label} | failed: {c['error']} | | | |")
            continue
        ratio = f"{c['kernels'] / plain:.2f}x" if plain else "—"
        lines.append(f"| {label} | {c['kernels']:.0f} | {ratio} | {c['syncs']:.1f} | {c['copies']:.1f} |")
    return "\n".join(lines)


def run_bench(args, device, out_dir, deadline, env) -> dict:
    import torch

    from . import report
    from .bench import run_comparison
    from .methods import MethodSpec
    from .models import DEFAULT_BATCH, make_workload
    from .report import Row

    result = {"device": str(device), "models": {}, "skipped": [], "settings": {}}
    json_path = os.path.join(out_dir, "gpu-bench.json")
    md_path = os.path.join(out_dir, "gpu-bench.md")
    bargs = argparse.Namespace(
        wait_idle=0.0, max_grad_norm=1.0, rounds=args.rounds, warmup=args.warmup, slow_ms=3000.0,
        slow_rounds=3, seed=0, timing="user",
    )
    result["settings"] = vars(bargs).copy()
    t_start = time.perf_counter()
    for model in bench_models(args):
        if time.perf_counter() > deadline:
            result["skipped"].append(model)
            continue
        t_model = time.perf_counter()
        entry: dict = {}
        try:
            batch = args.batch_size or DEFAULT_BATCH.get(model, 32)
            work = make_workload(model, device, batch, args.seq_len, seed=0)
            bs = [b for b in (args.b or [1, 8, 32]) if b <= batch and batch % b == 0]
            specs = [MethodSpec("engine", b, "auto") for b in bs]
            if not args.no_opacus:
                specs.append(MethodSpec("opacus", 1, "ghost"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows, info = run_comparison(work, specs, bargs, label=model)
            if device.type == "cuda":
                for row in sorted(rows, key=Row.sort_key):
                    if row.status != "ok" or time.perf_counter() > deadline:
                        continue
                    row.mem_mb, row.mem_note = cuda_extra_memory(work, row.spec, bargs.max_grad_norm)
            entry = {"tag": work.tag, "batch_size": work.batch_size, "seq_len": work.seq_len, "run": info,
                     "table": report.main_table(rows, work.batch_size),
                     "rows": [r.to_json() for r in sorted(rows, key=Row.sort_key)]}
            if device.type == "cuda":
                entry["cuda_counts"] = cuda_counts_of(work, sorted(rows, key=Row.sort_key), bargs.max_grad_norm,
                                                      deadline)
        except Exception as err:  # noqa: BLE001 (one model failing never stops the run)
            entry = {"error": _short(err, 500), "where": traceback.format_exc(limit=-3).strip().splitlines()[-4:]}
            log(f"  [bench] {model}: FAILED {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - t_model, 1)
        result["models"][model] = entry
        log(f"  [bench] {model}: {entry['seconds']} s")
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        _write_json(json_path, result)
        _write_text(md_path, render_bench(result, env))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_json(json_path, result)
    _write_text(md_path, render_bench(result, env))
    return result


def _ratio_summary(entry: dict) -> str:
    parts = []
    for r in entry.get("rows", []):
        if r["kind"] == "plain":
            parts.append(f"plain {r['median_ms']:.2f} ms" if r.get("median_ms") else "plain —")
            continue
        name = f"b={r['b']}" if r["kind"] == "engine" else f"Opacus {r['mode']}"
        if r["status"] != "ok":
            parts.append(f"{name} {r['status']}")
        elif r.get("ratio") is not None:
            mem = f", {r['extra_peak_mb']:+.0f} MB" if isinstance(r.get("extra_peak_mb"), (int, float)) else ""
            parts.append(f"{name} {r['ratio']:.2f}x{mem}")
    return "; ".join(parts)


def render_bench(res: dict, env: dict) -> str:
    s = res["settings"]
    lines = [
        f"# dp-microclip benchmark on {res['device']} ({env.get('gpu') or 'no GPU'})",
        "",
        f"{env.get('date')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Opacus {env.get('opacus')}, "
        f"transformers {env.get('transformers')}, dp_microclip {env.get('dp_microclip')} (commit "
        f"{env.get('commit')}). TF32 off. {s['rounds']} interleaved rounds after {s['warmup']} warm-up step(s); "
        f"C = {s['max_grad_norm']}; {res.get('seconds', 0)} s.",
        "",
        "Timed: the user's whole step (`opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); "
        "opt.step()`)" + (", `torch.cuda.synchronize` before and after" if res["device"].startswith("cuda") else "")
        + ", garbage collector on, nothing freed outside the "
        "clock; each method's step right after a plain step, `ratio to plain` = median of the paired ratios. "
        "Every method is first checked against the naive loop (float32, 1e-4). Extra peak memory (CUDA only): "
        "`torch.cuda.max_memory_allocated` during two steps minus the memory allocated before them, in this "
        "process (`peak MB over setup`), minus plain's. Opacus: `make_private`, ghost clipping, noise 0; on "
        "GPT-2 and LLaMA with a criterion giving one loss per example (mean over its tokens). Hugging Face "
        "models get `position_ids` expanded to (B, T) (see `benchmarks/models.py`).",
        "",
    ]
    if res.get("skipped"):
        lines += [f"Skipped (time budget): {', '.join(res['skipped'])}.", ""]
    lines += ["## Summary (ratio to plain, extra peak MB over plain)", ""]
    for model, entry in res["models"].items():
        lines.append(f"- **{model}**: " + (f"FAILED: {entry['error']}" if "error" in entry else _ratio_summary(entry)))
    lines.append("")
    for model, entry in res["models"].items():
        if "error" in entry:
            continue
        lines += [f"## {entry['tag']}", "", entry["table"], ""]
        if entry.get("cuda_counts"):
            lines += [render_cuda_counts(entry["cuda_counts"]), ""]
    return "\n".join(lines)


# ============================================================================ main
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the smoke path)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results/gpu)")
    p.add_argument("--sections", default="env,correctness,bench", help="comma-separated (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke: correctness on auto/bookkeeping only, bench on tiny shapes (HF *_tiny models), 1 round")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds a section may spend before it stops starting new cases (default: env 60, "
                        "correctness 150, bench 300)")
    p.add_argument("--cases", default=None, help="correctness: comma-separated case names (default all)")
    p.add_argument("--modes", default=None, help="correctness: grad_modes (default auto,bookkeeping,materialize,func)")
    p.add_argument("--precisions", default=None, help="correctness: fp32,bf16 (default both)")
    p.add_argument("--models", default=None, help="bench: comma-separated models (default mlp,cnn,transformer + HF)")
    p.add_argument("--b", default=None, help="bench: engine micro-batch sizes (default 1,8,32)")
    p.add_argument("--batch-size", type=int, default=None, help="bench: override every model's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="bench: override the sequence length")
    p.add_argument("--rounds", type=int, default=None, help="bench: interleaved rounds (default 15; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="bench: warm-up steps (default 3; quick 1)")
    p.add_argument("--no-opacus", action="store_true")
    args = p.parse_args(argv)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    args.sections = split(args.sections)
    args.cases, args.modes, args.precisions, args.models = (split(args.cases), split(args.modes),
                                                            split(args.precisions), split(args.models))
    args.b = [int(x) for x in split(args.b)] if args.b else None
    if args.quick:
        args.modes = args.modes or ["auto", "bookkeeping"]
        args.batch_size = args.batch_size or 8
        args.seq_len = args.seq_len or 8
        args.b = args.b or [1, 8]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "results", "gpu")
    os.makedirs(out_dir, exist_ok=True)
    env = env_info(args.device)
    _write_json(os.path.join(out_dir, "gpu-env.json"), env)
    if "env" in args.sections:
        log("[env] " + ", ".join(f"{k}={env.get(k)}" for k in ("python", "torch", "torch_cuda", "cuda_available",
                                                                  "gpu", "opacus", "transformers", "dp_microclip")))
        for m in env["missing"]:
            log(f"[env] MISSING: {m}")
    if env.get("torch") is None or env.get("dp_microclip") is None:
        log("[env] cannot run: torch or dp_microclip does not import (see above)")
        return 3
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("[env] --device cuda but torch.cuda.is_available() is False; use --device cpu for the smoke path")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(min(2, threads))
    code = 0
    summary = {}
    for section in ("correctness", "bench"):
        if section not in args.sections:
            continue
        budget = args.budget_s or DEFAULT_BUDGET[section]
        deadline = time.perf_counter() + budget
        log(f"[{section}] starting (budget {budget:.0f} s)")
        try:
            if section == "correctness":
                res = run_correctness(args, device, out_dir, deadline)
                st = [r["status"] for r in res["rows"]]
                summary[section] = (f"{st.count('ok')} ok, {st.count('MISMATCH')} mismatch, {st.count('error')} "
                                    f"error of {len(st)}; skipped {res['skipped'] or 'none'}; registered types "
                                    f"without a case: {res.get('missing_types') or 'none'}")
            else:
                res = run_bench(args, device, out_dir, deadline, env)
                summary[section] = "\n".join(
                    f"  {m}: " + (f"FAILED {e['error']}" if "error" in e else _ratio_summary(e))
                    for m, e in res["models"].items()) + (f"\n  skipped: {res['skipped']}" if res["skipped"] else "")
        except Exception as err:  # noqa: BLE001
            summary[section] = f"section crashed: {_short(err, 500)}"
            log(traceback.format_exc())
            code = 1
    if device.type == "cpu":
        torch.set_num_threads(threads)
    if summary:
        text = "\n".join(f"[{k}] {v}" for k, v in summary.items())
        print("\n==== summary ====\n" + text, flush=True)
        with open(os.path.join(out_dir, "gpu-summary.md"), "a") as fh:
            fh.write(f"## {time.strftime('%Y-%m-%dT%H:%M:%S')} {args.device}: {', '.join(summary)}\n\n"
                     f"```\n{text}\n```\n\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
