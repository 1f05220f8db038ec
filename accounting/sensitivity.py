"""The privacy rule table: which noise multiplier the accountant sees, or a refusal.

This module is the only place the rules of docs/accounting.md (the sensitivity table) live. Let
S(D) = sum over micro-batches j of clip(g_j), each clipped to norm C, and let
the engine add N(0, (z C)^2 I). The accountant analyses the Poisson-subsampled
Gaussian mechanism with noise multiplier z_acc = z / k, where k C bounds the
change that one record makes to S:

=================  ==========================  ===========  ==================  =====
micro_batch_size   grouping                    adjacency    ||S(D) - S(D')||    z_acc
=================  ==========================  ===========  ==================  =====
b = 1              each record its own group   add_remove   C                   z
b > 1              keyed                       add_remove   2C                  z / 2
b = 1              each record its own group   replace_one  2C                  z
b > 1              keyed                       replace_one  4C                  z / 2
b > 1              contiguous                  any          unbounded           refused
any                adaptive clipping           any          data-dependent      refused
any                shuffled epochs             any          (not Poisson)       refused
user unit, any b   one group per sampled user  add_remove   C                   z
user unit, any b   one group per sampled user  replace_one  2C                  z
=================  ==========================  ===========  ==================  =====

User-level rows (``privacy_unit="user"``): neighbours differ by one user with
all of their examples; users are Poisson-sampled at rate q and each sampled
user's (at most k) examples form one micro-batch, so adding or removing a user
adds or removes one clipped term of norm <= C and changes no other group.

Why 2C for b > 1: adding a record x to keyed group j changes only that group's
clipped gradient, from clip(g_j) to clip(g_j'), two vectors of norm <= C.
Why replace_one keeps z_acc: Google's ``dp_accounting`` analyses replace-one
(``NeighboringRelation.REPLACE_ONE``, the only backend here that can, see
``backends/pld.py``) with the noise measured against one record's contribution
k C; the old and the new record each contribute at most k C, and may sit in
different keyed groups, so the two sums are up to 2 k C apart (2C at b = 1, 4C
at b > 1), which is exactly what that analysis covers.

``per_layer`` bounds C_l and ``normalize`` (g / (||g|| + gamma), norm < 1)
follow the same rule as ``fixed`` because the engine scales the noise by the
total bound (sqrt(sum C_l^2), or 1), so z stays relative to it.

A step without noise (z None or 0) is not private whatever its structure: the
ledger records it and epsilon is infinite. The refusals below apply to noisy
steps, where a number would otherwise be reported.
"""

from __future__ import annotations

import dataclasses

from accounting.errors import PrivacyRefusal
from accounting.mechanism import Mechanism


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Sensitivity of the clipped sum, in units of the clipping bound C.

    Attributes:
        contribution: bound on one record's contribution to the sum (k above);
            the accountant's noise multiplier is z / contribution.
        neighbour_distance: bound on ||S(D) - S(D')|| for neighbouring D, D'
            under the mechanism's adjacency (2 * contribution for replace_one).
    """

    contribution: int
    neighbour_distance: int


def check_accountable(mechanism: Mechanism) -> None:
    """Raise if a noisy step of this shape has no example-level guarantee.

    Call it before training, with the noise the run will use, to fail early
    rather than at the first step.

    Args:
        mechanism: the step to check; its noise multiplier is ignored.

    Raises:
        PrivacyRefusal: adaptive clipping, shuffled epochs, or contiguous
            groups with b > 1; the message says what to use instead.
    """
    if mechanism.clipping == "adaptive":
        raise PrivacyRefusal(
            'No epsilon: clipping="adaptive" clips to a data-dependent bound (the smallest group norm), '
            'which is not DP: one record can change every clipped gradient. Use clipping="fixed" with a '
            "public max_grad_norm."
        )
    if mechanism.sampling == "shuffle":
        raise PrivacyRefusal(
            'No epsilon: sampling="shuffle": shuffled epochs are not Poisson sampling, and the '
            "accountant analyses Poisson sampling only. Use Poisson sampling (engine.data_loader(...))."
        )
    if mechanism.grouping == "contiguous" and mechanism.micro_batch_size > 1:
        raise PrivacyRefusal(
            f'No epsilon: contiguous micro-batches (b={mechanism.micro_batch_size}) after sampling have no '
            "example-level guarantee: adding one example shifts every later group. Use "
            'grouping="keyed" with engine.data_loader(...).'
        )


def sensitivity(mechanism: Mechanism) -> Sensitivity:
    """The row of the rule table that applies to ``mechanism``.

    Args:
        mechanism: the step; its noise multiplier is ignored.

    Returns:
        The contribution and neighbour-distance bounds in units of C.

    Raises:
        PrivacyRefusal: as :func:`check_accountable`.

    Example:
        >>> sensitivity(Mechanism(sample_rate=0.01, noise_multiplier=1.0, micro_batch_size=8))
        Sensitivity(contribution=2, neighbour_distance=2)
    """
    check_accountable(mechanism)
    # b = 1: a record is its own group, so it moves only its own clipped term.
    # b > 1 (keyed): it moves one group's clipped term, two vectors of norm <= C.
    # A user (privacy_unit="user") is one whole group, present or absent: one clipped term.
    contribution = 1 if mechanism.micro_batch_size == 1 or mechanism.privacy_unit == "user" else 2
    distance = contribution if mechanism.adjacency == "add_remove" else 2 * contribution
    return Sensitivity(contribution=contribution, neighbour_distance=distance)


def effective_noise_multiplier(mechanism: Mechanism) -> float:
    """The noise multiplier the accountant sees for one step.

    With micro_batch_size > 1 the sensitivity is 2C, so the engine's z becomes
    z / 2: at the same z, epsilon is much larger than at b = 1 (about 14.7
    instead of 2.4 in the MNIST setting of ``accounting-reference.md``).

    Args:
        mechanism: the step.

    Returns:
        z / contribution (see the module table), or 0.0 when the step adds no
        noise (``noise_multiplier`` None or 0): such a step is non-private and
        makes epsilon infinite; it is not refused.

    Raises:
        PrivacyRefusal: a noisy step of a shape with no guarantee (see
            :func:`check_accountable`).

    Example:
        >>> effective_noise_multiplier(Mechanism(sample_rate=0.01, noise_multiplier=1.1, micro_batch_size=8))
        0.55
    """
    if not mechanism.is_private:
        return 0.0
    assert mechanism.noise_multiplier is not None  # is_private
    return mechanism.noise_multiplier / sensitivity(mechanism).contribution
