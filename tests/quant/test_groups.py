"""quant.groups: the one row-order rule every backend and the act-order load pass use."""

import pytest
import torch

from quant.format import FormatError
from quant.groups import GroupOrderError, group_sort_perm


def test_plain_g_idx_needs_no_order():
    assert group_sort_perm(torch.arange(12, dtype=torch.int32) // 4, 12, 4) is None
    assert group_sort_perm(torch.zeros(10, dtype=torch.int32), 10, -1) is None  # one group over K


def test_act_order_g_idx_sorts_stably_into_runs():
    g = torch.tensor([2, 0, 1, 0, 2, 1], dtype=torch.int32)
    perm = group_sort_perm(g, 6, 2)
    assert perm.tolist() == [1, 3, 2, 5, 0, 4]  # ties keep their input order
    assert torch.equal(g[perm].long(), torch.arange(6) // 2)


def test_groups_that_are_not_runs_are_refused_with_their_sizes():
    g = torch.tensor([0] * 5 + [1] * 3, dtype=torch.int32)
    with pytest.raises(GroupOrderError, match=r"group_size=4 .*\[5, 3\]") as err:
        group_sort_perm(g, 8, 4)
    assert isinstance(err.value, FormatError)
