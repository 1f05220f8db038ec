"""The loss side of the per-example contract (issue 24, finding 3): ``engine.loss`` and its DP check.

A coupled loss (in-batch contrastive, a token mean over the whole batch, class weights normalised by the
batch, a division by the batch size) trained silently before: each test here refusing one failed on the
code without ``engine.loss``. Gradients are compared with the naive micro-batch loop
(``dp_microclip.reference``) and the neighbour distance of one DP step (noise off) with the bound C.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from dp_microclip import DP, ConfigurationError, PrivacyError
from dp_microclip.losses import causal_lm_per_example_loss
from dp_microclip.reference import naive_microbatch_grads

N, C = 100, 1.0
WEIGHTS = torch.tensor([1.0, 4.0, 0.5])


def per_example_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def class_weighted_mean(out, y):  # F.cross_entropy(out, y, weight=WEIGHTS) written per example: sum_i w_i l_i / sum w
    return F.cross_entropy(out, y, reduction="none") * WEIGHTS[y] / WEIGHTS[y].sum() * len(y)


def contrastive(out, y):  # in-batch negatives: every other example of the batch is a negative
    z = F.normalize(out, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z), device=z.device), reduction="none")


def divided_by_batch(out, y):  # a mean loss under loss_reduction="sum" (finding 3: 1.85 C)
    return F.cross_entropy(out, y, reduction="none") / len(y)


COUPLED = {"contrastive": contrastive, "class-weighted mean": class_weighted_mean, "divided by B": divided_by_batch}


def flat_data(n=N, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def dp_attach(m, b=1, lr=0.1, **dp):
    dp = {"noise_multiplier": 1.0, "sample_rate": 0.2, "delta": 1e-5, "accountant": "rdp", **dp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed warning
        return dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=lr), micro_batch_size=b, max_grad_norm=C,
                                   seed=0, privacy=DP(**dp))


def sampled(engine, data=None):
    return next(iter(engine.data_loader(data or flat_data())))


# ------------------------------------------------------------------ coupled losses are refused
@pytest.mark.parametrize("name", list(COUPLED))
def test_a_loss_that_couples_examples_is_refused_at_engine_loss(name):
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    with pytest.raises(PrivacyError, match=r"each example's loss depends on that example only.*loss of example \d+ "
                                           r"is .* but .* when rows .* are removed.*reduction='none'"):
        engine.loss(COUPLED[name], m(x), y)


def test_a_token_mean_over_the_whole_batch_is_refused_and_the_per_example_token_mean_passes():
    """(B, T, V) logits, padded labels: HF's token mean written per example divides by the batch's token count."""
    torch.manual_seed(0)
    vocab, t = 11, 7
    m = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab))
    tokens = torch.randint(0, vocab, (N, t))
    lengths = torch.randint(2, t + 1, (N,))
    labels = torch.where(torch.arange(t) < lengths[:, None], tokens, -100)
    data = TensorDataset(tokens, labels)

    def batch_token_mean(logits, labels):  # sum_i sum_t l_it / sum_i n_i, as (B,) whose mean is HF's loss
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (B, T-1)
        return token.sum(1) / (labels[:, 1:] != -100).sum() * len(labels)

    engine = dp_attach(m)
    x, lab = sampled(engine, data)
    with pytest.raises(PrivacyError, match="token count"):
        engine.loss(batch_token_mean, m(x), lab)
    engine.detach()
    engine = dp_attach(m)
    x, lab = sampled(engine, data)
    engine.loss(causal_lm_per_example_loss, m(x), lab).backward()
    engine.optimizer.step()
    assert engine.steps_taken == 1


def test_nested_arguments_are_cut_per_example_huggingface_outputs_and_dicts():
    from transformers.modeling_outputs import SequenceClassifierOutput

    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    out = m(x)
    wrapped = SequenceClassifierOutput(logits=out)
    engine.loss(lambda o, batch: per_example_ce(o.logits, batch["y"]), wrapped, {"y": y, "note": "kept"})
    with pytest.raises(PrivacyError, match="depends on that example only"):
        engine.loss(lambda o, batch: contrastive(o.logits, batch["y"]), wrapped, {"y": y})


# ------------------------------------------------------------------ a correct loss: equal to the naive loop
def _naive(m, x, y, groups, num_groups):
    return naive_microbatch_grads(m, lambda o, t: F.cross_entropy(o, t), x, y, group_index=groups,
                                  num_groups=num_groups, max_grad_norm=C)


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_per_example_loss_gives_the_naive_loops_gradient_in_dp_mode(b, reduction):
    m = mlp(dtype=torch.float64)
    reference = copy.deepcopy(m)
    data = TensorDataset(flat_data().tensors[0].double(), flat_data().tensors[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=b,
                                     max_grad_norm=C, seed=0, loss_reduction=reduction,
                                     privacy=DP(noise_multiplier=1.0, sample_rate=0.2, delta=1e-5, accountant="rdp"))
    engine.noise = False
    x, y = sampled(engine, data)
    out = m(x)
    loss = engine.loss(per_example_ce, out, y)
    expected = per_example_ce(out, y).sum() if reduction == "sum" else per_example_ce(out, y).mean()
    assert torch.allclose(loss, expected, rtol=1e-12)  # the scale: sum = B * mean
    loss.backward()
    groups = engine.last_groups
    engine.optimizer.step()
    want = _naive(reference, x, y, groups.index, groups.num_groups)  # sum_j clip(g_j) / num_groups
    public_m = round(0.2 * N / b)  # the engine divides by the public M = round(q N / b)
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, want[name] * groups.num_groups / public_m, rtol=1e-9, atol=1e-12), name
    assert "Every step's loss went through engine.loss" in engine.privacy_statement()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noise_free_engine_loss_reduces_without_a_check(reduction):
    m = mlp(dtype=torch.float64)
    reference = copy.deepcopy(m)
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=2, max_grad_norm=C,
                                 loss_reduction=reduction)
    x, y = flat_data(8)[:]
    x = x.double()
    calls = []

    def counted(out, y):
        calls.append(len(y))
        return contrastive(out, y) if len(calls) > 1 else per_example_ce(out, y)

    engine.loss(counted, m(x), y).backward()
    engine.optimizer.step()
    assert calls == [8]  # one evaluation: no check noise-free
    want = naive_microbatch_grads(reference, lambda o, t: F.cross_entropy(o, t), x, y, micro_batch_size=2,
                                  max_grad_norm=C)
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad, want[name], rtol=1e-9, atol=1e-12), name
    engine.loss(contrastive, m(x), y)  # noise-free: coupling is the user's business, not refused


def test_the_check_runs_once_per_signature_with_2_log2_b_subsets():
    m = mlp()
    engine = dp_attach(m)
    sizes: list[int] = []

    def counted(out, y):
        sizes.append(len(y))
        return per_example_ce(out, y)

    data = flat_data()
    loader = engine.data_loader(data)
    batches = iter(loader)
    x, y = next(batches)
    engine.loss(counted, m(x), y).backward()
    engine.optimizer.step()
    b = len(y)
    assert len(sizes) == 2 + 2 * math.ceil(math.log2(b))  # the graded loss, the reference, the subsets
    assert sum(sizes[2:]) == b * math.ceil(math.log2(b))  # each subset pair covers the batch once
    sizes.clear()
    x, y = next(batches)
    engine.loss(counted, m(x), y).backward()  # a new batch size, the same signature: no check
    engine.optimizer.step()
    assert sizes == [len(y)]


def test_a_batch_of_one_example_is_compared_with_itself_doubled_and_checked_again_later():
    m = mlp()
    engine = dp_attach(m, sampling="poisson", expected_batch_size=8, sample_rate=0.08)
    x, y = flat_data(9)[:]
    with pytest.raises(PrivacyError, match="a copy of the batch joins it"):
        engine.loss(contrastive, m(x[:1]), y[:1])
    engine.optimizer.zero_grad()
    sizes: list[int] = []

    def counted(out, y):
        sizes.append(len(y))
        return per_example_ce(out, y)

    engine.loss(counted, m(x[1:2]), y[1:2]).backward()
    engine.optimizer.step()
    assert sizes == [1, 1, 2]  # the graded loss, the reference, the batch doubled
    sizes.clear()
    engine.loss(counted, m(x[1:]), y[1:]).backward()  # the first batch of 2+: the full check
    engine.optimizer.step()
    assert sizes == [8, 8] + [4] * 6


def test_random_draws_and_dropout_in_the_loss_are_not_coupling_and_the_callers_rng_is_kept():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    out = m(x)

    def noisy(out, y):
        return per_example_ce(F.dropout(out, 0.3), y)

    torch.manual_seed(5)
    want, after = noisy(out, y).mean(), torch.rand(3)
    torch.manual_seed(5)
    got = engine.loss(noisy, out, y)
    assert torch.equal(torch.rand(3), after) and torch.allclose(got, want)


# ------------------------------------------------------------------ the measured sensitivity of an accepted loss
def _clipped_sum(x, y, loss_fn, via_engine):
    m = mlp(seed=3, dtype=torch.float64)
    engine = dp_attach(m, lr=0.0, sampling="poisson", expected_batch_size=8, sample_rate=0.08,
                       require_verified_loss=via_engine)  # the plain path measures what an unverified loss does
    engine.noise = False
    out = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unverified-loss warning of the plain path
        (engine.loss(loss_fn, out, y) if via_engine else loss_fn(out, y).mean()).backward()
        engine.optimizer.step()
    return torch.cat([p.grad.flatten() for p in m.parameters()]) * 8  # p.grad = clipped sum / M, M = 8


def test_one_added_record_moves_an_accepted_losss_clipped_sum_by_at_most_c():
    """One DP step, noise off, on D and on D plus one record x (b = 1): the distance is at most C. The
    coupled contrastive loss, backpropagated without engine.loss, moves it by more (why it is refused)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    extras = [scale * torch.randn(1, 6, generator=g, dtype=torch.float64) for scale in (1.0, 10.0, 100.0)] + [-x[:1]]
    worst = {True: 0.0, False: 0.0}
    for extra in extras:
        x2, y2 = torch.cat([x, extra]), torch.cat([y, torch.tensor([2])])
        for accepted, loss_fn in ((True, per_example_ce), (False, contrastive)):
            change = _clipped_sum(x2, y2, loss_fn, accepted) - _clipped_sum(x, y, loss_fn, accepted)
            worst[accepted] = max(worst[accepted], float(change.norm()) / C)
    assert worst[True] <= 1 + 1e-9
    assert worst[False] > 1.5  # the coupled loss without engine.loss: the measurement sees it (2.29 C)
    with pytest.raises(PrivacyError):
        _clipped_sum(x2, y2, contrastive, True)


# ------------------------------------------------------------------ bad shapes, bad calls
@pytest.mark.parametrize("loss_fn, match", [
    (lambda o, y: F.cross_entropy(o, y), r"returned a scalar.*reduction='none'"),
    (lambda o, y: F.cross_entropy(o, y, reduction="none")[:, None].expand(-1, 2), r"shape \(\d+, 2\).*flatten\(1\)"),
    (lambda o, y: F.cross_entropy(o, y, reduction="none")[1:], r"latest forward pass of the attached model had"),
    (lambda o, y: y, r"floating tensor of per-example losses"),
    (lambda o, y: F.cross_entropy(o, y, reduction="none").tolist(), r"returned list"),
])
def test_a_loss_that_is_not_one_value_per_example_is_refused_with_the_fix(loss_fn, match):
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    with pytest.raises(ConfigurationError, match=match):
        engine.loss(loss_fn, m(x), y)


def test_passing_a_computed_loss_instead_of_the_function_is_refused():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    with pytest.raises(ConfigurationError, match=r"takes the loss FUNCTION first.*Found Tensor"):
        engine.loss(F.cross_entropy(m(x), y, reduction="none"))


def test_a_loss_fn_that_fails_on_a_subset_names_the_rule():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    b = len(y)
    fixed = torch.ones(b)

    def needs_full_batch(out, y, w):  # a tensor of size B that is not batched: cut to a subset, view(b) fails
        return per_example_ce(out, y) * w.view(b).mean()

    with pytest.raises(ConfigurationError, match=r"failed on a subset.*closure or functools.partial"):
        engine.loss(needs_full_batch, m(x), y, fixed)
    engine.loss(lambda out, y: per_example_ce(out, y) * fixed.sum() / b, m(x), y)  # captured, not cut: accepted


def test_a_sequence_first_argument_is_refused_naming_dimension_0():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    out = m(x)
    seq_first = out[None].expand(5, -1, -1)  # (T, B, V)
    with pytest.raises(ConfigurationError, match=r"batch in dimension 0.*transpose\(0, 1\)"):
        engine.loss(lambda o, y: per_example_ce(o.mean(0), y), seq_first, y)


# ------------------------------------------------------------------ hostile call orders
def test_engine_loss_twice_in_one_step_sums_verified_losses():
    m = mlp()
    engine = dp_attach(m, require_verified_loss=True)
    x, y = sampled(engine)
    out = m(x)
    (engine.loss(per_example_ce, out, y) + 0.1 * engine.loss(lambda o, t: o.square().mean(1), out, y)).backward()
    engine.optimizer.step()
    assert engine.steps_taken == 1


def test_two_backward_passes_of_two_engine_losses_are_refused_as_accumulation():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    out = m(x)
    engine.loss(per_example_ce, out, y).backward(retain_graph=True)
    engine.loss(per_example_ce, out, y).backward()
    with pytest.raises(PrivacyError, match="backward passes before one optimizer.step"):
        engine.optimizer.step()


def test_engine_loss_outside_a_step_is_refused_in_dp_mode_and_allowed_for_evaluation():
    m = mlp()
    engine = dp_attach(m)
    x, y = sampled(engine)
    out = m(x)
    engine.loss(per_example_ce, out, y).backward()
    engine.optimizer.step()
    with pytest.raises(ConfigurationError, match="no forward pass of the attached model since the last"):
        engine.loss(per_example_ce, out, y)  # the last step's output
    with torch.no_grad():
        value = engine.loss(per_example_ce, m(x), y)  # evaluation: reduced, nothing checked
    assert value.dim() == 0
    x, y = sampled(engine)
    out = m(x)
    with torch.no_grad():  # a validation batch of another size between the forward and the step
        engine.loss(per_example_ce, m(x[:3]), y[:3])
    engine.loss(per_example_ce, out, y).backward()
    engine.optimizer.step()


def test_noise_free_then_dp_the_dp_engine_checks_again():
    m = mlp()
    plain = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=C)
    x, y = flat_data(8)[:]
    plain.loss(contrastive, m(x), y).backward()
    plain.optimizer.step()
    plain.detach()
    fresh = mlp()
    engine = dp_attach(fresh)
    xb, yb = sampled(engine)
    with pytest.raises(PrivacyError, match="depends on that example only"):
        engine.loss(contrastive, fresh(xb), yb)


def test_after_detach_engine_loss_only_reduces():
    m = mlp()
    engine = dp_attach(m)
    engine.detach()
    x, y = flat_data(8)[:]
    loss = engine.loss(contrastive, m(x), y)  # plain training now: nothing to verify, no step to refuse
    assert torch.allclose(loss, contrastive(m(x), y).mean())


def test_dp_with_noise_off_still_checks():
    m = mlp()
    engine = dp_attach(m)
    engine.noise = False
    x, y = sampled(engine)
    with pytest.raises(PrivacyError, match="depends on that example only"):
        engine.loss(contrastive, m(x), y)


# ------------------------------------------------------------------ steps that skip engine.loss
def test_a_step_without_engine_loss_warns_once_at_the_users_line_and_the_statement_says_so():
    m = mlp()
    engine = dp_attach(m, require_verified_loss=False)  # the opt-out: run, warn, and say so
    batches = iter(engine.data_loader(flat_data()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x, y = next(batches)
            F.cross_entropy(m(x), y).backward()
            line = sys._getframe().f_lineno + 1
            engine.optimizer.step()
    found = [w for w in caught if "did not go through engine.loss" in str(w.message)]
    assert len(found) == 1 and (found[0].filename, found[0].lineno) == (__file__, line)
    assert "2 of the 2 steps computed their loss outside engine.loss" in engine.privacy_statement()
    state = engine.state_dict()
    resumed = dp_attach(mlp(seed=1), require_verified_loss=False)
    resumed.load_state_dict(state)
    assert "2 of the 2 steps computed their loss outside engine.loss" in resumed.privacy_statement()


@pytest.mark.parametrize("explicit", [False, True])
def test_a_step_that_skipped_engine_loss_is_refused_by_default(explicit):
    m = mlp()
    engine = dp_attach(m, require_verified_loss=True) if explicit else dp_attach(m)
    x, y = sampled(engine)
    out = m(x)
    engine.loss(per_example_ce, out, y)  # computed, then not the one backpropagated
    F.cross_entropy(out, y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(PrivacyError, match=r"did not run through a loss returned by engine.loss.*"
                                           r"engine.loss\(loss_fn, out, y\).*require_verified_loss=False"):
        engine.optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))  # refused before any update
    assert engine.steps_taken == 0  # and before the ledger


def test_the_verified_default_passes_a_plain_loop_through_engine_loss_with_no_warning():
    m = mlp()
    engine = dp_attach(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in engine.data_loader(flat_data()):
            engine.optimizer.zero_grad()
            engine.loss(per_example_ce, m(x), y).backward()
            engine.optimizer.step()
    assert engine.steps_taken > 0 and "Every step's loss went through engine.loss" in engine.privacy_statement()


def test_require_verified_loss_takes_a_bool():
    with pytest.raises(ConfigurationError, match="require_verified_loss=...\\) takes True or False"):
        dp_attach(mlp(), require_verified_loss="yes")


# ------------------------------------------------------------------ physical batches, user-level DP
def test_physical_chunks_each_go_through_engine_loss_and_the_step_is_verified():
    m = mlp()
    engine = dp_attach(m, require_verified_loss=True, sample_rate=0.5)
    chunks = 0
    for x, y in engine.data_loader(flat_data(), max_physical_batch_size=16):
        engine.loss(per_example_ce, m(x), y).backward()
        engine.optimizer.step()
        chunks += 1
        if engine.steps_taken == 2:
            break
    assert chunks > 2  # several chunks per step
    assert "Every step's loss went through engine.loss" in engine.privacy_statement()


def test_user_level_dp_keeps_users_whole_in_the_check():
    """A loss that couples rows of the same user is per user (the user's micro-batch is clipped as one):
    accepted; one that couples users is refused."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (60,), generator=g)
    data = TensorDataset(torch.randn(60, 6, generator=g), torch.randint(0, 3, (60,), generator=g), ids)
    m = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=3,
                                     max_grad_norm=C, seed=0, privacy=DP(
                                         noise_multiplier=1.0, sample_rate=0.5, delta=1e-5, accountant="rdp",
                                         privacy_unit="user", max_examples_per_user=3))
    loader = engine.data_loader(data, user_ids=ids)

    def within_user(out, y, users):  # each row's loss over its user's mean loss
        losses = per_example_ce(out, y)
        same = (users[:, None] == users[None, :]).to(losses.dtype)
        return losses / (same @ losses / same.sum(1))

    x, y, users = next(iter(loader))
    assert len(torch.unique(users)) > 1
    engine.loss(within_user, m(x), y, users).backward()
    engine.optimizer.step()
    x, y, users = next(iter(loader))
    with pytest.raises(PrivacyError, match="each user's loss depends on that user only"):
        engine.loss(lambda o, t, u: contrastive(o, t), m(x), y, users)


# ------------------------------------------------------------------ DPTrainer routes its loss through engine.loss
@pytest.mark.slow
def test_dptrainer_losses_are_verified_and_a_coupled_per_example_loss_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf_trainer import DP_SETTINGS, gpt2, run_trainer, text_rows

    trainer = run_trainer(gpt2(), text_rows(False), tmp_path, DP_SETTINGS)
    assert trainer.engine is not None
    assert "Every step's loss went through engine.loss" in trainer.engine.privacy_statement()

    def batch_token_mean(outputs, labels):  # HF's token mean over the whole batch, written per example
        token = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        return token.sum(1) / (labels[:, 1:] != -100).sum() * len(labels)

    with pytest.raises(PrivacyError, match="depends on that example only"):
        run_trainer(gpt2(), text_rows(False), tmp_path / "coupled", DP_SETTINGS, per_example_loss=batch_token_mean)


# ------------------------------------------------------------------ several processes: each rank checks its rows
def _distributed_rank(rank: int, world: int, out_dir: str) -> None:
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    import dp_microclip.distributed as mcd

    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = mlp()
            engine = mcd.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=C,
                                privacy=DP(noise_multiplier=1.0, sample_rate=0.3, delta=1e-5, accountant="rdp"))
            batches = iter(engine.data_loader(flat_data()))
            x, y = next(batches)
            engine.loss(per_example_ce, m(x), y).backward()
            engine.optimizer.step()
            x, y = next(batches)
            try:
                engine.loss(contrastive, m(x), y)
                refused = ""
            except PrivacyError as err:
                refused = str(err)
            result = {"statement": engine.privacy_statement(), "refused": refused,
                      "params": [p.detach().clone() for p in m.parameters()]}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    from .test_distributed import exit_now

    exit_now()  # gloo can abort a finished rank in the interpreter's teardown (see exit_now)


@pytest.mark.slow
def test_each_rank_checks_its_own_rows_under_distributed_dp(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_distributed_rank, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in results:
        assert "Every step's loss went through engine.loss" in r["statement"]
        assert "depends on that example only" in r["refused"]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"]))  # one shared step
