"""FSDP2 (``fully_shard``) under dp_microclip.distributed: 2 gloo ranks on CPU equal 1 process.

Each test spawns its 2 ranks (``tests.test_distributed.run_ranks``), runs many
checks in one pair of processes and compares with the single-process engine on
the unsharded model, computed in the test process: noise-free to 1e-10
(float64), DP with the same seed (one noise draw: each rank's shard of the
noise is its slice of the one-process draw), the noise std on each shard,
epsilon on every rank, parameter and gradient memory per rank, the first-step
check on the unsharded parameters, and the refusals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
import dp_microclip.distributed as mcd
from dp_microclip import ConfigurationError
from tests.test_distributed import SPLIT, batch, close, run_ranks
from .helpers import OwnLossDP

STEPS = 3
CASES = {  # name: (clipping, b, optimizer, reshard_after_forward)
    "fixed-b1": ("fixed", 1, "sgd", True),
    "fixed-b2": ("fixed", 2, "sgd", True),
    "adaptive-b2": ("adaptive", 2, "sgd", True),
    "normalize-b1-adam": ("normalize", 1, "adam", True),
    "fixed-b2-no-reshard": ("fixed", 2, "sgd", False),
    "fixed-b2-reshard-int": ("fixed", 2, "sgd", 1),  # reshard to world size 1 after forward
}


def small_model():
    """Uneven shards on 2 ranks (9 rows: 5 and 4; 3 rows: 2 and 1); the LayerNorm sits in the root's group."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3)).double()


def big_model():
    """Even shards (every dim divisible by 2): 5360 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 48)).double()


def shard_model(m, reshard=True):
    from torch.distributed.fsdp import fully_shard

    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(m, reshard_after_forward=reshard)
    return m


def optimizer(kind, m):
    return torch.optim.SGD(m.parameters(), lr=0.1) if kind == "sgd" else torch.optim.Adam(m.parameters(), lr=0.01)


def full_params(m):
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in m.named_parameters()}


def train(attach, m, opt, batches, **kwargs):
    engine = attach(m, opt, **kwargs)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return engine


def step_batches(rank=None):
    out = []
    for s in range(STEPS):
        x, y = batch(s)
        if rank is not None:
            rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
            x, y = x[rows], y[rows]
        out.append((x, y))
    return out


class Mixed(nn.Module):
    """Every other supported rule under FSDP2: Embedding, RMSNorm, Conv1d, GroupNorm (uneven shards)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rms = nn.Embedding(11, 8), nn.RMSNorm(8)
        self.conv, self.gn, self.head = nn.Conv1d(8, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Linear(6, 3)

    def forward(self, idx):
        h = self.rms(self.emb(idx)).transpose(1, 2)  # (B, 8, T)
        return self.head(torch.tanh(self.gn(self.conv(h))).mean(-1))


def mixed_model():
    from torch.distributed.fsdp import fully_shard

    m = Mixed().double()
    if torch.distributed.is_initialized():
        for sub in (m.emb, m.conv, m.head, m):
            fully_shard(sub)
    return m


def mixed_batches(rank=None):
    out = []
    for s in range(STEPS):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randint(0, 11, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)
        if rank is not None:
            rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
            x, y = x[rows], y[rows]
        out.append((x, y))
    return out


class DirectRead(nn.Module):
    """Reads ``ln.weight`` outside ``ln``'s call: the first-step check must catch it on the unsharded weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.ln, self.head = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.ln(self.fc(x))) * self.ln.weight)


# ------------------------------------------------------------------ noise-free: what each rank runs
def noise_free_task(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    res = {}
    for name, (mode, b, opt_kind, reshard) in CASES.items():
        m = shard_model(small_model(), reshard)
        opt = optimizer(opt_kind, m)
        engine = train(mcd.attach, m, opt, step_batches(rank), micro_batch_size=b, clipping=mode, max_grad_norm=0.3)
        res[name] = full_params(m)
        res[f"{name}-grad-types"] = {type(p.grad).__name__ for p in m.parameters()}
        engine.detach()
    # An evaluation forward under no_grad with reshard_after_forward=False leaves the parameters gathered:
    # attach reshards them first.
    m = shard_model(small_model(), False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.no_grad():
        m(step_batches(rank)[0][0])
    res["eval-first-gathered"] = not any(isinstance(p, DTensor) for p in m.parameters())
    train(mcd.attach, m, opt, step_batches(rank), micro_batch_size=2, max_grad_norm=0.3).detach()
    res["eval-first"] = full_params(m)
    for b in (1, 2):
        m = mixed_model()
        engine = train(mcd.attach, m, optimizer("sgd", m), mixed_batches(rank), micro_batch_size=b, max_grad_norm=0.3)
        res[f"mixed-b{b}"] = full_params(m)
        engine.detach()
    # The first-step check sees the unsharded parameters' real gradients (it is not vacuous under FSDP).
    for reshard in (True, False, 1):
        m = DirectRead().double()
        for sub in (m.fc, m.head, m):
            fully_shard(sub, reshard_after_forward=reshard)
        with pytest.raises(ConfigurationError, match="'ln.weight'.*outside its module"):
            train(mcd.attach, m, torch.optim.SGD(m.parameters(), lr=0.1), step_batches(rank)[:1],
                  micro_batch_size=1, max_grad_norm=0.3)
    # Refusals, on every rank alike.
    m = small_model()
    fully_shard(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
    with pytest.raises(ConfigurationError, match="MixedPrecisionPolicy"):
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=0.3)
    m = nn.Sequential(nn.Linear(5, 8), nn.PReLU(8), nn.Linear(8, 3)).double()
    fully_shard(m)
    with pytest.raises(ConfigurationError, match="PReLU.*not verified under FSDP2"):
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=0.3)
    from torch.distributed.device_mesh import init_device_mesh

    m = small_model()
    fully_shard(m, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(ConfigurationError, match="HSDP"):
        mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=0.3)
    res["refusals_done"] = True
    res["dtensor"] = all(isinstance(p, DTensor) for p in shard_model(small_model()).parameters())
    return res


def test_fsdp_two_ranks_equal_one_process_noise_free(tmp_path):
    r0, r1 = run_ranks(tmp_path, "noise_free_task", module=__name__)
    for name, (mode, b, opt_kind, _) in CASES.items():
        m = small_model()
        opt = optimizer(opt_kind, m)
        train(dp_microclip.attach, m, opt, step_batches(), micro_batch_size=b, clipping=mode, max_grad_norm=0.3)
        want = {n: p.detach() for n, p in m.named_parameters()}
        close(r0[name], want)  # 3 steps on 2 ranks = 3 steps of one process on the union of the shares
        close(r1[name], want)
        assert r0[f"{name}-grad-types"] == {"DTensor"}  # p.grad is this rank's shard
    assert r0["eval-first-gathered"] and r1["eval-first-gathered"]
    close(r0["eval-first"], r0["fixed-b2-no-reshard"])  # the same steps as without the evaluation forward
    for b in (1, 2):
        m = mixed_model()
        train(dp_microclip.attach, m, optimizer("sgd", m), mixed_batches(), micro_batch_size=b, max_grad_norm=0.3)
        want = {n: p.detach() for n, p in m.named_parameters()}
        close(r0[f"mixed-b{b}"], want)
        close(r1[f"mixed-b{b}"], want)
    assert r0["refusals_done"] and r1["refusals_done"] and r0["dtensor"]


# ------------------------------------------------------------------ DP: what each rank runs
Z, C, Q, N, B = 50.0, 0.5, 0.25, 64, 2  # a large z: the gradient is noise, whose std is z C / M


def dp_dataset():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(N, 32, generator=g, dtype=torch.float64), torch.randint(0, 48, (N,), generator=g))


def dp_run(attach, m, steps):
    """``steps`` DP steps at lr 0.1, then one at lr 0 whose p.grad is returned (noise plus a tiny signal)."""
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    engine = attach(m, opt, micro_batch_size=B, max_grad_norm=C, seed=11,
                    privacy=OwnLossDP(noise_multiplier=Z, sample_rate=Q, delta=1e-5, accountant="rdp"))
    it = iter(engine.data_loader(dp_dataset()))
    raw_hidden = None
    for i in range(steps + 1):
        if i == steps:
            opt.param_groups[0]["lr"] = 0.0
        x, y = next(it)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        if i == 0:  # the checked step: autograd's raw gradient never reaches p.grad (FSDP reduce-scatters none)
            raw_hidden = all(p.grad is None for p in m.parameters())
        opt.step()
    return engine, raw_hidden


def dp_task(rank, world):
    m = shard_model(big_model())
    engine, raw_hidden = dp_run(mcd.attach, m, 2)
    local = {n: (p.to_local().detach().clone(), p.grad.to_local().clone()) for n, p in m.named_parameters()}
    full = sum(p.numel() * p.element_size() for p in m.parameters())
    held = sum(t.untyped_storage().nbytes() for p in m.parameters() for t in (p.to_local(), p.grad.to_local()))
    gathered = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    return {"raw_hidden": raw_hidden, "local": local, "grads": gathered, "params": full_params(m), "eps": engine.epsilon(),
            "memory_ratio": held / (2 * full), "sharded_after": all(type(p).__name__ == "DTensor"
                                                                    for p in m.parameters())}


def test_fsdp_dp_one_noise_draw_std_epsilon_and_memory(tmp_path):
    r0, r1 = run_ranks(tmp_path, "dp_task", module=__name__)
    m = big_model()
    engine, raw_hidden = dp_run(dp_microclip.attach, m, 2)
    assert raw_hidden and r0["raw_hidden"] and r1["raw_hidden"]
    want_params = {n: p.detach() for n, p in m.named_parameters()}
    want_grads = {n: p.grad for n, p in m.named_parameters()}
    for r in (r0, r1):
        close(r["params"], want_params)  # the same steps, noise included: one draw, as one process
        close(r["grads"], want_grads)
        assert r["eps"] == pytest.approx(engine.epsilon(), rel=1e-12)
        # each rank holds half the parameters and half the gradients (even shards), nothing unsharded
        assert r["memory_ratio"] == pytest.approx(0.5, abs=0.01) and r["sharded_after"]
    assert r0["eps"] == r1["eps"]
    m_public = round(Q * N / B)
    want_std = Z * C / m_public
    for n, g in want_grads.items():
        rows = torch.chunk(g, 2, dim=0)
        for rank, r in enumerate((r0, r1)):
            shard = r["local"][n][1]
            close({n: shard}, {n: rows[rank]})  # this rank's slice of the one global draw (sums round apart)
            if shard.numel() >= 1000:  # the std of the noise on each shard: z C / M (~2% sampling error)
                assert float(shard.std()) == pytest.approx(want_std, rel=0.08), n
        if g.dim() == 2:  # no repeated draw: the shards' noise is not the same numbers
            assert not torch.allclose(r0["local"][n][1][: len(rows[1])], r1["local"][n][1])
