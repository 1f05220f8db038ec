"""Ragged groups (keyed grouping, the sampler's draws) know R, the largest group, on the host.

Each pass pads groups to R rows; reading R from ``sizes`` on an accelerator would wait for the device once a
pass (DP mode with b > 1). The groups are drawn on the host, so R is taken there and carried when they move.
The meta device stands in for an accelerator: reading a value from it fails, so a test passes only if
nothing is read back from it.
"""

from __future__ import annotations

import pytest
import torch

from dp_microclip import grouping


@pytest.mark.parametrize("seed", range(5))
def test_keyed_groups_carry_their_largest_size_to_another_device(seed):
    groups = grouping.keyed_groups(37, 5, torch.Generator().manual_seed(seed))
    want = int(torch.bincount(groups.index, minlength=5).max())
    moved = groups.to(torch.device("meta"))
    assert moved.index.device.type == "meta" and moved.largest == want
    assert moved.max_size() == want  # no read of the meta tensor (it would raise)
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(moved.sizes.max().item())  # what a read would have done


@pytest.mark.parametrize("requested", ["keyed", "user"])
def test_the_samplers_and_the_users_draws_are_grouped_on_the_host_then_moved(requested):
    """The loader's draws (a host tensor) become groups on the host and then move to the batch's device, R
    with them; keyed draws of the engine's own generator the same."""
    plan = grouping.GroupingPlan(micro_batch_size=2, requested=requested, dp=False, num_groups=3)
    drawn = torch.tensor([0, 2, 2, 1, 2, 0])
    gen = torch.Generator().manual_seed(0)
    for groups in (plan.groups(6, "meta", drawn, gen), plan.groups(6, "meta", None, gen)):
        groups = groups.to(torch.device("meta"))  # where the pass moves them (aggregate: to the gradients' device)
        assert groups.index.device.type == "meta"
        assert groups.max_size() == (groups.largest or groups.equal_size)  # no read of the meta tensor
    assert plan.groups(6, "meta", drawn, gen).max_size() == 3
