"""A plain-language privacy statement for a ledger.

Modelled on what TF Privacy's ``compute_dp_sgd_privacy_statement`` reports
(which also halves z when micro-batching is used), written for this project's
rules: it names the adjacency, the sampling (and whether the guarantee rests on
the user's declaration of it), the grouping, whether micro-batches of b > 1
were the clipping unit (sensitivity 2C, so the accountant sees z / 2), the
steps and noise of every phase, and epsilon at delta. If any step was taken
without noise it says that epsilon is infinite and from which step.
"""

from __future__ import annotations

import math

from accounting import backends
from accounting.backends import AccountantSpec
from accounting.ledger import Ledger, LedgerEntry
from accounting.sensitivity import sensitivity

_ACCOUNTANT_NAMES = {
    "rdp": "Renyi DP (Opacus RDPAccountant); an upper bound, typically 5-15% above the tight value",
    "rdp_google": "Renyi DP (dp_accounting RdpAccountant); an upper bound, typically 5-15% above the tight value",
    "prv": "privacy loss random variables (Opacus PRVAccountant, Gopi et al. 2021); a tight upper bound",
    "pld": "privacy loss distributions (dp_accounting PLDAccountant); a tight upper bound",
}

_ADJACENCY_TEXT = {
    "add_remove": "add/remove-one: neighbouring datasets differ by adding or removing one example",
    "replace_one": "replace-one: neighbouring datasets differ by replacing one example with another",
}


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _clipping_unit(entry: LedgerEntry) -> str:
    mech = entry.mechanism
    b = mech.micro_batch_size
    if not entry.is_private:
        return f"micro-batch size b={b}, grouping={mech.grouping!r}, clipping={mech.clipping!r}"
    assert mech.noise_multiplier is not None and entry.effective_noise_multiplier is not None  # is_private
    sens = sensitivity(mech)
    if mech.privacy_unit == "user":
        unit = (f"user-level micro-batch clipping: each sampled user's examples (at most "
                f"k={mech.max_examples_per_user}) form one micro-batch whose mean gradient is clipped to C")
    elif b == 1:
        unit = "per-example clipping (b=1: every example is its own micro-batch)"
    else:
        unit = (
            f"micro-batch clipping with b={b} (micro-batch = the clipping unit, as in TF Privacy; "
            "keyed groups: each example's group is drawn independently of the other examples)"
        )
    dist = sens.neighbour_distance
    sens_text = f"sensitivity {'' if dist == 1 else dist}C"
    if sens.contribution == 1:
        noise = f"the accountant uses the noise multiplier as given, z={_fmt(mech.noise_multiplier)}"
    else:
        noise = (
            f"so the accountant uses z/{sens.contribution} = {_fmt(entry.effective_noise_multiplier)} "
            f"for the engine's z={_fmt(mech.noise_multiplier)}"
        )
    if mech.adjacency == "replace_one":
        noise += f" (replace-one analysis with one {mech.privacy_unit}'s contribution bounded by " + (
            "C)" if sens.contribution == 1 else f"{sens.contribution}C)"
        )
    return f"{unit}; {sens_text}, {noise}"


def privacy_statement(
    ledger: Ledger,
    delta: float,
    *,
    accountant: AccountantSpec = "prv",
    sampling_declared_by_user: bool = False,
    dataset_size: int | None = None,
) -> str:
    """Explain, in plain words, what guarantee the recorded run has.

    Args:
        ledger: the run's history.
        delta: the delta to report epsilon at.
        accountant: the backend to compute epsilon with.
        sampling_declared_by_user: True when the batches did not come from the
            engine's Poisson loader and the user declared the sampling; the
            statement then says the guarantee rests on that declaration.
        dataset_size: if given, the statement also gives the expected batch
            size and the number of epochs (for user-level ledgers: the number
            of users, and the expected users per step).

    Returns:
        A multi-line text, ending with the epsilon line.

    Raises:
        PrivacyRefusal: the backend cannot analyse the ledger's adjacency.

    Example:
        >>> from accounting import Ledger, Mechanism
        >>> ledger = Ledger()
        >>> ledger.record(Mechanism(sample_rate=0.01, noise_multiplier=1.0), steps=100)
        >>> print(privacy_statement(ledger, 1e-5, accountant="rdp").splitlines()[-1])
        Epsilon: 1.214 at delta = 1e-05.
    """
    name = backends.name_of(accountant)
    eps = ledger.epsilon(delta, accountant)
    entries = ledger.entries
    lines = ["DP-SGD privacy statement (dp-microclip)"]
    if not entries:
        lines += ["No steps recorded: nothing has been released, so epsilon is 0.", "Epsilon: 0 at delta = "
                  f"{delta:g}."]
        return "\n".join(lines)
    users = ledger.privacy_unit == "user"
    if users:
        k = entries[0].mechanism.max_examples_per_user
        lines.append(f"Adjacency: {_ADJACENCY_TEXT[ledger.adjacency].replace('example', 'user')}, with all of "
                     "their examples. The guarantee protects one user (every example they contributed), whatever "
                     "the number of their examples.")
        lines.append(f"Contribution bound: a sampled user contributes at most k={k} examples per step, chosen "
                     "uniformly at random among their examples (k is public).")
    else:
        lines.append(f"Adjacency: {_ADJACENCY_TEXT[ledger.adjacency]}. The guarantee protects one example, not one "
                     "user with several examples.")
    unit = "user" if users else "example"
    sampling = f"Poisson sampling: every step includes each {unit} independently with the probability q below"
    if sampling_declared_by_user:
        sampling += (". Declared by the user, not performed by the engine: the guarantee rests on that declaration "
                     "(a loader with fixed-size or shuffled batches does not satisfy it)")
    else:
        sampling += " (performed by the engine's loader)"
    lines.append(f"Sampling: {sampling}.")
    if dataset_size is not None:
        epochs = sum(e.steps * e.sample_rate for e in entries)
        lines.append(f"Dataset: {dataset_size} {unit}s; {epochs:.4g} epochs in expectation.")
    lines.append(f"Steps: {ledger.steps} in {len(entries)} phase(s):")
    start = 1
    for e in entries:
        end = start + e.steps - 1
        span = f"step {start}" if e.steps == 1 else f"steps {start}-{end}"
        what = "users per step" if users else "batch size"
        batch = f", expected {what} {e.sample_rate * dataset_size:.4g}" if dataset_size is not None else ""
        if e.is_private:
            assert e.mechanism.noise_multiplier is not None  # is_private
            lines.append(f"  {span}: q={e.sample_rate:.6g}{batch}, noise multiplier "
                         f"z={_fmt(e.mechanism.noise_multiplier)}"
                         f" (std z*C), clipping={e.mechanism.clipping!r}; {_clipping_unit(e)}.")
        else:
            lines.append(f"  {span}: q={e.sample_rate:.6g}{batch}, NO NOISE (noise multiplier "
                         f"{e.mechanism.noise_multiplier}); {_clipping_unit(e)}.")
        start = end + 1
    bad = ledger.first_nonprivate_step
    if bad is not None:
        lines.append(
            f"Step {bad + 1} (counting from 1) was taken without noise: its update reveals the clipped gradients "
            "exactly, so no finite epsilon holds for this run. Epsilon is infinite from that step on; the noisy "
            "steps alone do not describe what was released."
        )
    lines.append(f"Accountant: {_ACCOUNTANT_NAMES.get(name, name)}.")
    lines.append("Assumes: the training loss is the mean (or sum) of per-example losses, each depending on its own "
                 "example only; a loss averaged over all tokens of a batch couples examples and voids this guarantee.")
    lines.append("Not covered: privacy cost of hyperparameter tuning, and any data used outside these steps.")
    lines.append(f"Epsilon: {_fmt(eps)} at delta = {delta:g}.")
    return "\n".join(lines)
