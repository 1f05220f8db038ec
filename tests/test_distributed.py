"""dp_microclip.distributed: 2 ranks give what 1 process gives (noise-free, DP, per-core, the loader, resume).

Each test starts its ranks itself (``torch.multiprocessing.start_processes``,
gloo over a file store in ``tmp_path``), runs many checks inside one pair of
processes (starting Python and torch twice costs more than the checks), bounds
the run with a deadline, kills the ranks on failure, and gets the results back
through files in ``tmp_path``. The single-process references are computed in
the test process itself.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
import dp_microclip.distributed as mcd
from dp_microclip import ConfigurationError, PrivacyError, UnsupportedModuleError
from dp_microclip.reference import naive_microbatch_grads
from .helpers import OwnLossDP

DEADLINE_S = 150  # per pair of ranks; a hang (a collective one rank never joins) fails instead of blocking
MODES = ("fixed", "adaptive", "per_layer", "normalize")
SPLIT = 8  # rank 0 gets rows [0, 8), rank 1 rows [8, 12): unequal shares, so the weighting matters


# ------------------------------------------------------------------ running ranks
def _entry(rank: int, world: int, out_dir: str, task: str, backend: str, module: str = __name__) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    done = False
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = getattr(importlib.import_module(module), task)(rank, world)
        torch.save(result, out / f"rank{rank}.pt")
        done = True
    except BaseException:
        import traceback

        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if done:
        exit_now()


def exit_now() -> None:
    """End a rank that finished its work without the interpreter's teardown.

    torch's gloo backend can abort a process at exit under load ("terminate called without an active
    exception", SIGABRT): a worker thread of the process group releases a finished all-gather's tensors while
    the interpreter is finalising, and a thread that asks for the GIL then is unwound through a noexcept frame
    (seen in a core dump, on this tree and before it). The rank's results are already saved.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(tmp_path: Path, task: str, world: int = 2, backend: str = "gloo", module: str = __name__) -> list[dict]:
    """Run ``task(rank, world)`` (a function of ``module``) on ``world`` spawned ranks; return each rank's result."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path), task, backend, module), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{task}: the ranks did not finish within {DEADLINE_S} s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.err")))
        pytest.fail(f"{task} failed on a rank:\n{errors}")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------ shared set-ups (ranks and reference)
def batch(seed=0, n=12, d=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def mlp(d_in=5, hidden=8, d_out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def dataset(n=40, d=6):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def bounds(model, C):
    names = [n for n, _ in model.named_parameters()]
    return {n: C * (1 + i % 3) / 2 for i, n in enumerate(names)}


def clip_kwargs(model, mode, b, C=0.3):
    return dict(micro_batch_size=b, clipping=mode, max_grad_norm=bounds(model, C) if mode == "per_layer" else C)


def loss_of(model, x, y):
    out = model(x)
    return F.cross_entropy(out, y) if len(y) else out.sum() * 0  # an empty share still makes a step


def one_step(attach, model, passes, lr=0.0, **kwargs):
    """Attach with ``attach``, run backward on each (x, y) of ``passes``, step; return {name: grad}, engine."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = attach(model, opt, **kwargs)
    for x, y in passes:
        loss_of(model, x, y).backward()
    opt.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    engine.detach()
    return grads


def shard(x, y, rank):
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    return x[rows], y[rows]


def train_loader(engine, model, make_loader, steps):
    """``steps`` optimizer steps on the loader's batches (a new epoch when one runs out)."""
    it = iter(make_loader())
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(make_loader())
            x, y = next(it)
        engine.optimizer.zero_grad()
        loss_of(model, x, y).backward()
        engine.optimizer.step()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ noise-free: what each rank runs
def noise_free_task(rank, world):
    res = {}
    x, y = batch(0)
    x2, y2 = batch(1)
    for mode in MODES:
        for b in (1, 2):
            m = mlp()
            res[f"{mode}-b{b}"] = one_step(mcd.attach, m, [shard(x, y, rank)], **clip_kwargs(m, mode, b))
    m = mlp()  # gradient accumulation: two backward passes (two global batches) before one step
    res["accumulate"] = one_step(mcd.attach, m, [shard(x, y, rank), shard(x2, y2, rank)],
                                 **clip_kwargs(m, "fixed", 2))
    for mode in ("fixed", "adaptive"):  # per-core: each rank's whole (unequal) share is one micro-batch
        m = mlp()
        res[f"per_core-{mode}"] = one_step(mcd.attach, m, [shard(x, y, rank)], per_core=True, micro_batch_size=6,
                                           clipping=mode, max_grad_norm=0.3)
    # A rank that steps without any backward pass (an empty share it skipped) still joins the step.
    m = mlp()
    res["skip-backward"] = one_step(mcd.attach, m, [shard(x, y, 0)] if rank == 0 else [], **clip_kwargs(m, "fixed", 2))
    # A parameter used on one rank only counts as zero on the other: check the weighting directly.
    m = TwoHeads()
    m.use_b = rank == 0
    xs, ys = shard(x, y, rank)
    local = one_step(dp_microclip.attach, copy.deepcopy(m), [(xs, ys)], micro_batch_size=2, max_grad_norm=0.3)
    res["two_heads_local"] = local
    res["two_heads"] = one_step(mcd.attach, m, [(xs, ys)], micro_batch_size=2, max_grad_norm=0.3)
    # The usage route with a parameter used on rank 0 only and one used nowhere: the ranks agree on which are
    # present (the reducer's table), so the collectives match and every rank writes the same p.grad.
    m = TokenOnOneRank()
    m.use_token = rank == 0
    res["token_local"] = one_step(dp_microclip.attach, copy.deepcopy(m), [(xs, ys)], micro_batch_size=2,
                                  max_grad_norm=0.3)
    res["token"] = one_step(mcd.attach, m, [(xs, ys)], micro_batch_size=2, max_grad_norm=0.3)
    # The loader, noise-free: b = 2 (global keyed groups) and b = 1 on a 1-record dataset (rank 1 always empty).
    for b, n in ((2, 40), (1, 1)):
        m = mlp(d_in=6)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        engine = mcd.attach(m, opt, micro_batch_size=b, max_grad_norm=0.3, seed=7)
        data = dataset(n)
        train_loader(engine, m, lambda: mcd.data_loader(engine, data, batch_size=max(1, n // 4) if n > 1 else 0.6),
                     steps=3)
        res[f"loader-b{b}"] = params_of(m)
    return res


class TokenOnOneRank(nn.Module):
    """No rule (the usage route): ``token`` is added where ``use_token`` is set, ``never`` is never touched."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 8).double()
        self.token = nn.Parameter(0.3 * torch.randn(8, dtype=torch.float64))
        self.never = nn.Parameter(torch.randn(8, dtype=torch.float64))
        self.head = nn.Linear(8, 3).double()
        self.use_token = True

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.tanh(h + self.token if self.use_token else h))


class TwoHeads(nn.Module):
    """head_b is used only where ``use_b`` is set (here: on rank 0 only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 8).double()
        self.head_a = nn.Linear(8, 3).double()
        self.head_b = nn.Linear(8, 3).double()
        self.use_b = True

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head_a(h) + self.head_b(h) if self.use_b else self.head_a(h)


def close(a: dict, b: dict, tol=1e-10):
    assert set(a) == set(b), set(a) ^ set(b)
    for n in a:
        err = float((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-30))
        assert err < tol, (n, err)


def test_two_ranks_equal_one_process_noise_free(tmp_path):
    ranks = run_ranks(tmp_path, "noise_free_task")
    x, y = batch(0)
    x2, y2 = batch(1)
    for key in ranks[0]:  # every rank takes the same step
        if not key.endswith("_local"):
            close(ranks[0][key], ranks[1][key], tol=1e-14)
    for mode in MODES:
        for b in (1, 2):
            m = mlp()
            want = one_step(dp_microclip.attach, m, [(x, y)], **clip_kwargs(m, mode, b))
            close(ranks[0][f"{mode}-b{b}"], want)
    m = mlp()
    close(ranks[0]["accumulate"], one_step(dp_microclip.attach, m, [(x, y), (x2, y2)], **clip_kwargs(m, "fixed", 2)))
    for mode in ("fixed", "adaptive"):  # the naive loop with the ranks' shards as contiguous groups
        rank_of_row = (torch.arange(len(y)) >= SPLIT).long()
        want = naive_microbatch_grads(mlp(), F.cross_entropy, x, y, group_index=rank_of_row, num_groups=2,
                                      max_grad_norm=0.3, clipping=mode)
        close(ranks[0][f"per_core-{mode}"], want)
    m = mlp()
    close(ranks[0]["skip-backward"], one_step(dp_microclip.attach, m, [shard(x, y, 0)], **clip_kwargs(m, "fixed", 2)))
    # two heads: rank 0 holds head_b's only contribution, over 4 of the 6 groups.
    local0, local1 = ranks[0]["two_heads_local"], ranks[1]["two_heads_local"]
    assert "head_b.weight" not in local1
    for n, g in ranks[0]["two_heads"].items():
        other = local1.get(n, torch.zeros_like(g))
        close({n: g}, {n: (local0[n] * 4 + other * 2) / 6})
    # the usage route: the token is rank 0's alone (4 of 6 groups), "never" is left as plain PyTorch leaves it
    for r in range(2):
        assert "never" not in ranks[r]["token"] and "never" not in ranks[r]["token_local"]
    assert "token" not in ranks[1]["token_local"]
    close({"token": ranks[0]["token"]["token"]}, {"token": ranks[0]["token_local"]["token"] * 4 / 6})
    for b, n in ((2, 40), (1, 1)):  # the loader: the same coins, the same groups as one process
        m = mlp(d_in=6)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        engine = dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.3, seed=7)
        data = dataset(n)
        train_loader(engine, m, lambda: engine.data_loader(data, batch_size=max(1, n // 4) if n > 1 else 0.6), 3)
        close(ranks[0][f"loader-b{b}"], params_of(m))


# ------------------------------------------------------------------ DP: what each rank runs
DP_FIELDS = dict(noise_multiplier=1.0, delta=1e-5, accountant="rdp")


def big_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 60), nn.Tanh(), nn.Linear(60, 30)).double()


def dp_task(rank, world):
    res = {}
    # (a) each rank's own loader declared as Poisson is refused (issue 24, finding 8): a record could be in
    # several ranks' shares. That each step adds exactly one noise draw is shown by (b): with noise, the ranks
    # end at the parameters of one process with the same seed.
    m = big_mlp()
    with pytest.raises(PrivacyError, match="several ranks' shares"):
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=1, max_grad_norm=0.5,
                   privacy=OwnLossDP(sample_rate=0.5, expected_batch_size=12, sampling="poisson", **DP_FIELDS), seed=1234)
    # (b) the distributed loader, b = 2, 3 steps; checkpoint; a new engine resumes for 3 more steps.
    m = mlp(d_in=6)
    engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.25, **DP_FIELDS),
                        seed=99)
    data = dataset(64)
    train_loader(engine, m, lambda: engine.data_loader(data), 3)
    res["eps3"] = engine.epsilon()
    state = engine.state_dict(include_rng_state=True)
    engine.detach()
    engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.25, **DP_FIELDS))
    with pytest.raises(PrivacyError, match="load_state_dict"):
        engine.epsilon()
    engine.load_state_dict(state)
    res["eps3_resumed"] = engine.epsilon()
    train_loader(engine, m, lambda: mcd.data_loader(engine, data), 3)
    res["eps6"] = engine.epsilon()
    res["loader-params"] = params_of(m)
    engine.detach()
    # (c) empty shares: a 1-record dataset; rank 1's share is always empty (noise-only steps).
    m = mlp(d_in=6)
    engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.5, **DP_FIELDS), seed=5)
    one = dataset(1)
    sizes = []
    it = iter(mcd.data_loader(engine, one))
    for _ in range(2):
        xb, yb = next(it)
        sizes.append(len(yb))
        engine.optimizer.zero_grad()
        loss_of(m, xb, yb).backward()
        engine.optimizer.step()
    res["empty-sizes"], res["empty-params"] = sizes, params_of(m)
    engine.detach()
    # (d) secure noise: drawn on rank 0, broadcast.
    m = mlp(d_in=6)
    engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=1, max_grad_norm=0.5,
                        privacy=OwnLossDP(sample_rate=0.25, secure_rng=True, **DP_FIELDS))
    xb, yb = next(iter(mcd.data_loader(engine, dataset(64))))
    loss_of(m, xb, yb).backward()
    engine.optimizer.step()
    res["secure"] = {n: p.grad.clone() for n, p in m.named_parameters()}
    engine.detach()
    # (e) refusals, on every rank alike (no rank left waiting in a collective).
    res["refusals"] = refusals(rank)
    return res


def refusals(rank):
    out = {}
    m = mlp()
    with pytest.raises(ConfigurationError, match="disagree on.*attach") as err:
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=1.0 + rank)
    out["settings"] = str(err.value)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModuleError, match="GroupNorm"):
        mcd.attach(bn, torch.optim.SGD(bn.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.5, **DP_FIELDS))
    sync = nn.Sequential(nn.Linear(5, 4), nn.SyncBatchNorm(4))
    with pytest.raises(ConfigurationError, match="SyncBatchNorm.*GroupNorm"):
        mcd.attach(sync, torch.optim.SGD(sync.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    ddp = nn.parallel.DistributedDataParallel(mlp())
    with pytest.raises(ConfigurationError, match="unwrapped module"):
        mcd.attach(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    # FSDP2 (fully_shard) models: tests/test_fsdp.py
    # the engine's own loader is redirected to this rank's share
    m = mlp(d_in=6)
    engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=1.0)
    loader = engine.data_loader(dataset(40), batch_size=10)
    out["redirected"] = isinstance(loader.batch_sampler, mcd.DistributedPoissonBatchSampler)
    engine.detach()
    return out


USER_IDS = torch.arange(48) % 13  # 13 users with 3 or 4 examples each


def user_attach(attach, m):
    return attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=0.5, seed=7,
                  privacy=OwnLossDP(sample_rate=0.3, privacy_unit="user", max_examples_per_user=2, **DP_FIELDS))


def user_run(attach) -> dict:
    """4 user-level DP steps; the parameters, epsilon and the rows of every batch this process saw."""
    m = mlp(d_in=6)
    engine = user_attach(attach, m)
    seen = []

    def loader():
        for x, y in engine.data_loader(dataset(48), user_ids=USER_IDS):
            seen.append(len(y))
            yield x, y

    train_loader(engine, m, loader, 4)
    return {"params": params_of(m), "eps": engine.epsilon(), "rows": seen}


def user_task(rank, world):
    """User-level DP on two ranks: every rank draws the same users and keeps those whose slot is its own."""
    return user_run(mcd.attach)


def test_two_ranks_user_level_dp_equal_one_process(tmp_path):
    r0, r1 = run_ranks(tmp_path, "user_task")
    one = user_run(dp_microclip.attach)
    assert [a + b for a, b in zip(r0["rows"], r1["rows"])] == one["rows"]  # the ranks split each sampled batch
    assert any(a and b for a, b in zip(r0["rows"], r1["rows"]))
    close(r0["params"], one["params"])  # noise on: one draw, the same step as one process
    close(r1["params"], one["params"])
    assert r0["eps"] == r1["eps"] == pytest.approx(one["eps"], rel=1e-12)


def test_two_ranks_dp_one_noise_draw_epsilon_and_resume(tmp_path):
    r0, r1 = run_ranks(tmp_path, "dp_task")
    for key in ("loader-params", "empty-params", "secure"):
        close(r0[key], r1[key], tol=1e-14)  # every rank takes the same step
    # (b) the loader and resume: same params and epsilon as 6 steps of one process
    m = mlp(d_in=6)
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2,
                                 max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.25, **DP_FIELDS), seed=99)
    data = dataset(64)
    train_loader(engine, m, lambda: engine.data_loader(data), 3)
    assert r0["eps3"] == r1["eps3"] == r0["eps3_resumed"] == pytest.approx(engine.epsilon(), rel=1e-12)
    train_loader(engine, m, lambda: engine.data_loader(data), 3)
    assert r0["eps6"] == r1["eps6"] == pytest.approx(engine.epsilon(), rel=1e-12)
    assert math.isfinite(r0["eps6"]) and r0["eps6"] > r0["eps3"]
    close(r0["loader-params"], params_of(m))
    # (c) empty shares make noise-only steps, as one process does
    assert r1["empty-sizes"] == [0, 0]
    m = mlp(d_in=6)
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1,
                                 max_grad_norm=0.5, privacy=OwnLossDP(sample_rate=0.5, **DP_FIELDS), seed=5)
    it = iter(engine.data_loader(dataset(1)))
    sizes = []
    for _ in range(2):
        xb, yb = next(it)
        sizes.append(len(yb))
        engine.optimizer.zero_grad()
        loss_of(m, xb, yb).backward()
        engine.optimizer.step()
    assert sizes == r0["empty-sizes"]
    close(r0["empty-params"], params_of(m))
    # (e) refusals
    for r in (r0, r1):
        assert "max_grad_norm" in r["refusals"]["settings"]
        assert r["refusals"]["redirected"]


# ------------------------------------------------------------------ in-process checks (no ranks)
def test_refuses_without_a_process_group():
    m = mlp()
    with pytest.raises(ConfigurationError, match="init_process_group"):
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=1.0)


def test_per_core_is_noise_free_and_needs_the_local_batch_size():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ConfigurationError, match="noise-free"):
        mcd.attach(m, opt, per_core=True, micro_batch_size=4, max_grad_norm=1.0, privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1))
    with pytest.raises(ConfigurationError, match="micro_batch_size=<the per-rank batch size>"):
        mcd.attach(m, opt, per_core=True, max_grad_norm=1.0)
    with pytest.raises(ConfigurationError, match="remove grouping="):
        mcd.attach(m, opt, per_core=True, micro_batch_size=4, max_grad_norm=1.0, grouping="contiguous")


def test_data_loader_needs_a_distributed_engine():
    m = mlp(d_in=6)
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=1.0)
    with pytest.raises(ConfigurationError, match="dp_microclip.distributed.attach"):
        mcd.data_loader(engine, dataset(), batch_size=10)


# ------------------------------------------------------------------ NCCL (GPUs only)
def nccl_task(rank, world):
    x, y = batch(0)
    x, y = x.cuda(), y.cuda()
    rows = torch.arange(len(y)).chunk(world)[rank].cuda()
    m = mlp().cuda()
    grads = one_step(mcd.attach, m, [(x[rows], y[rows])], micro_batch_size=2, max_grad_norm=0.3)
    return {n: g.cpu() for n, g in grads.items()}


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="NCCL needs CUDA")
def test_nccl_ranks_equal_one_process(tmp_path):
    world = min(2, torch.cuda.device_count())
    ranks = run_ranks(tmp_path, "nccl_task", world=world, backend="nccl")
    x, y = batch(0)
    want = one_step(dp_microclip.attach, mlp(), [(x, y)], micro_batch_size=2, max_grad_norm=0.3)
    for r in ranks:
        close(r, want, tol=1e-9)
