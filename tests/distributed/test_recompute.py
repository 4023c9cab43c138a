"""Recomputation: the right ops rerun in backward, and training is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autoplan.backends.recompute import apply_recompute
from autoplan.zoo import build
from tests.distributed.equivalence import check_equivalence, hand_plan

pytestmark = pytest.mark.distributed  # spawns gloo ranks


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_op_counts(choice: str) -> dict[str, int]:
    """Ops run by backward of one MLP block under `choice` (forward runs outside the count)."""
    job = build("mlp-tiny", batch_size=4, device="cpu")
    apply_recompute(job.module, {"blocks.0": choice})
    output = job.module.blocks[0](torch.randn(4, job.module.config.hidden, requires_grad=True))
    with _CountOps() as counter:
        output.sum().backward()
    return counter.counts


def test_selective_recomputes_everything_but_the_matmuls():
    none, full, selective = (_backward_op_counts(choice) for choice in ("none", "full", "selective"))
    # A block's forward: addmm (fc1, fc2), layer norm, gelu. Backward alone runs none of them.
    forward_ops = ("aten.addmm.default", "aten.native_layer_norm.default", "aten.gelu.default")
    assert all(op not in none for op in forward_ops)
    # full: the forward again (up to the last tensor backward needs: fc2's output is not one)
    assert all(full.get(op, 0) >= 1 for op in forward_ops)
    # selective: the matmul outputs were saved; norm and activation are recomputed
    assert "aten.addmm.default" not in selective
    assert selective["aten.native_layer_norm.default"] == 1 and selective["aten.gelu.default"] == 1


def test_recompute_alone_trains_like_one_process():
    check_equivalence(
        "gpt-tiny", [hand_plan("gpt-tiny", 1, recompute="full"), hand_plan("gpt-tiny", 1, recompute="selective")]
    )
