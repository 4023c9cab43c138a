"""autoplan.bench.predict: the bench's candidates planned once and priced under other specs."""

import pytest

from autoplan import ClusterSpec
from autoplan.bench.predict import (
    entry_key,
    measured_constraints,
    pinned_constraints,
    plan_candidates,
    solution_key,
    step_s,
)
from autoplan.measure.calibration import reset_quantities


@pytest.fixture(scope="module")
def plans():
    return plan_candidates("gpt-tiny", ClusterSpec.local(world_size=4), global_batch_size=8)


def test_the_bench_candidates_are_planned_and_priced_as_the_planner_predicted(plans):
    assert set(plans.solutions) == {"autoplan", "ddp", "fsdp", "megatron", "pipeline"}
    cluster = ClusterSpec.local(world_size=4)
    for name, solution in plans.solutions.items():
        assert step_s(plans, name, cluster) == pytest.approx(solution.estimate.step_time_s)


def test_pricing_under_another_spec_keeps_the_plan_and_changes_the_time(plans):
    cluster = ClusterSpec.local(world_size=4)
    data = cluster.model_dump()
    data["intra_node"]["collective_overhead_us"] = data["inter_node"]["collective_overhead_us"] = 5000.0
    slower = ClusterSpec.model_validate(data)
    assert step_s(plans, "fsdp", slower) > step_s(plans, "fsdp", cluster)
    back = reset_quantities(slower, cluster, ["collective overhead"])
    assert step_s(plans, "fsdp", back) == pytest.approx(step_s(plans, "fsdp", cluster))


def test_a_pinned_solution_plans_the_same_configuration_again(plans):
    cluster = ClusterSpec.local(world_size=4)
    pinned = {name: pinned_constraints(solution) for name, solution in plans.solutions.items()}
    again = plan_candidates("gpt-tiny", cluster, global_batch_size=8, pinned=pinned)
    for name, solution in plans.solutions.items():
        assert solution_key(again.solutions[name]) == solution_key(solution), name


def test_a_bench_report_entry_is_pinned_back_to_what_ran(plans):
    solution = plans.solutions["megatron"]
    config = solution.config
    entry = {
        "name": "megatron",
        "measured_step_s": 0.1,
        "mesh": config.mesh,
        "plan": {**config.model_dump(exclude={"mesh"}), "recompute": ["none"]},
    }
    assert entry_key(entry) == solution_key(solution)
    constraints = measured_constraints({"candidates": [entry, {"name": "x", "measured_step_s": None}]})
    assert list(constraints) == ["megatron"]
    assert (constraints["megatron"].dp, constraints["megatron"].tp) == (config.dp, config.tp)
