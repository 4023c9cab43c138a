"""The planner calls a plan feasible only when its memory upper bound, the predicted peak x
(1 + the device kind's memory margin, autoplan.costmodels.uncertainty), fits the cap; when none
does, the error shows that arithmetic in one line and the device memory that would fit."""

from __future__ import annotations

import pytest

from autoplan.costmodels.uncertainty import memory_margin, peak_memory_upper_bytes, point_estimates
from autoplan.errors import InfeasibleError
from autoplan.planner.instance import build_instance
from autoplan.planner.placement import smallest_memory_plan
from autoplan.planner.precision import precision_choices
from autoplan.planner.search_space import split_layers
from autoplan.planner.solver import solve
from autoplan.schema.constraints import Constraints
from tests.planner.test_solver import tiny_cluster, tiny_profile

GB = 1e9
PINS = Constraints(dp=4, pp=1, tp=1, micro_batch_size=2, zero_stage=0, recompute="full", param_dtype="bfloat16")
"""One configuration on tiny_cluster's 4 devices: only the head's recompute is left free."""


def cluster_of(memory_bytes: float):
    """tiny_cluster with exactly `memory_bytes` per device (tiny_cluster adds the margin)."""
    cluster = tiny_cluster()
    return cluster.model_copy(update={"device": cluster.device.model_copy(update={"memory_bytes": int(memory_bytes)})})


def smallest_peak_bytes() -> float:
    """The point estimate of the least memory any plan under PINS needs (full recompute everywhere)."""
    profile, cluster = tiny_profile(), tiny_cluster()
    inst = build_instance(profile, cluster, split_layers(profile), (4, 1, 1), 2, PINS, precision_choices(cluster, PINS))
    assert inst is not None
    return smallest_memory_plan(inst).estimate.peak_memory_bytes


@pytest.mark.parametrize("fraction", [0.9, 0.5])
def test_a_plan_whose_point_estimate_fits_but_whose_upper_bound_does_not_is_refused(fraction):
    pins = PINS.model_copy(update={"max_memory_fraction": fraction})
    peak, margin = smallest_peak_bytes(), memory_margin("cuda")
    upper = peak * (1 + margin)
    memory_bytes = int(peak * (1 + margin / 2) / fraction)  # the cap between the estimate and the bound
    cap = fraction * memory_bytes
    assert peak < cap < upper
    with point_estimates():  # the point estimate alone fits
        assert solve(tiny_profile(), cluster_of(memory_bytes), pins).best.estimate.peak_memory_bytes <= cap
    with pytest.raises(InfeasibleError) as error:
        solve(tiny_profile(), cluster_of(memory_bytes), pins)
    message = str(error.value)
    assert "\n" not in message
    assert f"the smallest plan needs {upper / GB:.2f} GB per device > {cap / GB:.2f} GB" in message
    assert f"(max_memory_fraction {fraction} x {memory_bytes / GB:.0f} GB)" in message
    assert f"predicted peak {peak / GB:.2f} GB x (1 + memory margin {margin:.1%} from the cuda" in message
    assert f"it fits devices of memory_bytes >= {upper / fraction / GB:.2f} GB" in message
    assert (f"or max_memory_fraction >= {upper / memory_bytes:.3f}" in message) == (upper <= memory_bytes)
    enough = upper / fraction + 1_000  # a device of the size the message names fits it
    best = solve(tiny_profile(), cluster_of(enough), pins).best
    assert peak_memory_upper_bytes(best.estimate.peak_memory_bytes, "cuda") <= fraction * enough


@pytest.mark.parametrize("memory_bytes", [2_500_000_000, 4_000_000_000, 8_000_000_000])
def test_the_free_plan_upper_bound_fits_the_cap(memory_bytes):
    result = solve(tiny_profile(), cluster_of(memory_bytes))
    assert peak_memory_upper_bytes(result.best.estimate.peak_memory_bytes, "cuda") <= 0.9 * memory_bytes
    for runner in result.runners_up:
        if runner.why.startswith("needs "):  # ruled out by memory: the bound with its margin
            assert f"(+{memory_margin('cuda'):.0%}) > {0.9 * memory_bytes / GB:.1f} GB" in runner.why


def test_the_error_names_the_smallest_plan_under_the_pinned_schedule():
    """Interleaving holds more micro-batches in flight than 1F1B: with the schedule pinned the
    smallest plan is an interleaved one, and the error must not name a 1F1B plan that fits."""
    profile, cluster, margin = tiny_profile(), tiny_cluster(), memory_margin("cuda")
    pins = {"dp": 1, "pp": 2, "tp": 2, "micro_batch_size": 1, "zero_stage": 0, "recompute": "full"}
    uppers = {}
    for schedule, v in (("1f1b", 1), ("interleaved_1f1b", 2)):
        constraints = Constraints(**pins, schedule=schedule, virtual_stages=v, param_dtype="bfloat16")
        inst = build_instance(
            profile, cluster, split_layers(profile), (1, 2, 2), 1, constraints, precision_choices(cluster, constraints)
        )
        assert inst is not None and inst.schedules == [(schedule, v)]
        uppers[schedule] = smallest_memory_plan(inst).estimate.peak_memory_bytes * (1 + margin)
    assert uppers["1f1b"] < uppers["interleaved_1f1b"]
    memory_bytes = (uppers["1f1b"] + uppers["interleaved_1f1b"]) / 2 / 0.9
    interleaved = Constraints(**pins, schedule="interleaved_1f1b", virtual_stages=2, param_dtype="bfloat16")
    with pytest.raises(InfeasibleError) as error:
        solve(profile, cluster_of(memory_bytes), interleaved)
    assert f"needs {uppers['interleaved_1f1b'] / GB:.2f} GB per device > {0.9 * memory_bytes / GB:.2f} GB" in str(
        error.value
    )
