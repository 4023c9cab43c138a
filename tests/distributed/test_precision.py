"""Lossy precision options train on 4 gloo ranks within LOSSY_RTOL of float32 in one process
(docs/precision.md): bfloat16 gradient reduction (DDP's compress hook), float8 activation
storage beside tensor parallelism (DTensor saved tensors) and in a pipeline, and the
planner's free choice with allow_lossy=True."""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import _train_plans_on_rank, describe, plan_for, reference_run
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks

STEPS = 20
LOSSY_RTOL = 0.01
"""Loss of a lossy plan at every step, relative to float32 in one process (docs/precision.md)."""


def test_lossy_options_train_within_tolerance_of_float32():
    plans = [
        plan_for("gpt-tiny", 4, allow_lossy=True),
        plan_for("gpt-tiny", 4, dp=4, allow_lossy=True),
        plan_for("gpt-tiny", 4, dp=2, tp=2, activation_dtype="float8_e4m3fn"),
        plan_for("llama-tiny", 4, allow_lossy=True),
        plan_for("llama-tiny", 4, dp=2, pp=2, activation_dtype="float8_e4m3fn"),
    ]
    assert plans[1].grad_reduce_dtype == "bfloat16"
    assert set(plans[2].activation_storage_of().values()) == {"float8_e4m3fn"}
    references = {name: reference_run(name, STEPS)[0] for name in ("gpt-tiny", "llama-tiny")}
    per_rank = run_ranks(_train_plans_on_rank, 4, args=([p.model_dump_json() for p in plans], STEPS))
    for index, plan in enumerate(plans):
        expected = references[plan.model_name]
        for rank in range(4):
            losses = per_rank[rank][index][0]
            worst = max(abs(got - want) / want for got, want in zip(losses, expected))
            assert worst <= LOSSY_RTOL, (
                f"{describe(plan)} storage {plan.activation_storage_of()}: rank {rank} {worst:.2%}"
            )
