"""Plans the planner makes (not written by hand) train exactly like one process."""

import pytest

from tests.distributed.equivalence import check_equivalence, plan_for

pytestmark = pytest.mark.distributed  # spawns gloo ranks


def test_free_and_pinned_planner_plans_train_like_one_process():
    plans = [
        plan_for("gpt-tiny", 4),  # the planner's free choice
        plan_for("gpt-tiny", 4, dp=1, pp=2, tp=2),  # its stages, schedule, SP, ZeRO
        plan_for("gpt-tiny", 4, dp=2, tp=2, zero_stage=3, recompute="selective"),
    ]
    check_equivalence("gpt-tiny", plans)


def test_planner_plans_for_llama_and_a_non_transformer():
    check_equivalence("llama-tiny", [plan_for("llama-tiny", 4, dp=1, pp=2, tp=2, recompute="full")])
    check_equivalence("mlp-tiny", [plan_for("mlp-tiny", 2), plan_for("mlp-tiny", 2, pp=2, dp=1, tp=1)])
