import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks


def _all_reduce_rank(rank, world_size):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return value.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    return rank


def test_real_gloo_all_reduce():
    assert run_ranks(_all_reduce_rank, 2) == [3.0, 3.0]


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(AssertionError, match="rank one fails on purpose"):
        run_ranks(_fail_on_rank_one, 2, timeout_s=60)
