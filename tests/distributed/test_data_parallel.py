"""ZeRO 0-3 (replicate / fully_shard) train like one process, alone and with tensor parallelism."""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import check_equivalence, hand_plan

pytestmark = pytest.mark.distributed  # spawns gloo ranks


def test_zero_stages_on_gpt_two_ranks():
    # Two micro-batches per rank (hand_plan's default): ZeRO 0/1 defer the gradient sync to the
    # last one, ZeRO 2/3 reduce-scatter each; the tied embedding lives in the root's group.
    check_equivalence("gpt-tiny", [hand_plan("gpt-tiny", 2, dp=2, zero_stage=stage) for stage in (0, 1, 2, 3)])


def test_data_parallel_on_mlp_four_ranks():
    check_equivalence(
        "mlp-tiny",
        [
            hand_plan("mlp-tiny", 4, dp=4, recompute="full"),
            hand_plan("mlp-tiny", 4, dp=2, tp=2, zero_stage=2, recompute="selective"),
        ],
    )
