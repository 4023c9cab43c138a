"""Honest uncertainty (issue 14, item 3): a prediction carries the interval the calibration
residuals give (autoplan.costmodels.uncertainty), stored in the Plan (older plan files still
load) and shown by `explain` and `autoplan show --json`."""

from __future__ import annotations

import json

import pytest

from autoplan.costmodels.uncertainty import (
    memory_margin,
    peak_memory_upper_bytes,
    point_estimates,
    residuals_of,
    step_time_interval_s,
)
from autoplan.planner.planning import plan_from_profile
from autoplan.planner.report import explain, report
from autoplan.schema.plan import Plan
from tests.planner.test_solver import tiny_cluster, tiny_profile


def test_the_interval_is_on_the_true_value_given_the_prediction():
    """A residual is (predicted - true) / true: an under-prediction (low < 0) raises the upper end."""
    residuals = residuals_of("cuda")
    low, high = step_time_interval_s(2.0, "cuda")
    assert low == pytest.approx(2.0 / (1 + residuals.step_time_high))
    assert high == pytest.approx(2.0 / (1 + residuals.step_time_low))
    assert memory_margin("cuda") == pytest.approx(max(0.0, -residuals.memory_low / (1 + residuals.memory_low)))
    assert peak_memory_upper_bytes(1e9, "cpu") == pytest.approx(1e9 * (1 + memory_margin("cpu")))
    with point_estimates():
        assert step_time_interval_s(2.0, "cuda") == (2.0, 2.0) and memory_margin("cpu") == 0.0
    assert memory_margin("cuda") > 0  # restored after the block
    with pytest.raises(ValueError, match=r"device kind 'tpu' has no calibration residuals; known: \['cpu', 'cuda'\]"):
        residuals_of("tpu")


@pytest.fixture(scope="module")
def tiny_plan() -> Plan:
    return plan_from_profile(tiny_profile(), tiny_cluster())


def test_the_plan_carries_the_interval_and_round_trips(tiny_plan, tmp_path):
    predicted = tiny_plan.predicted
    assert predicted.step_time_interval_s == pytest.approx(step_time_interval_s(predicted.step_time_s, "cuda"))
    low, high = predicted.step_time_interval_s
    assert low < predicted.step_time_s < high
    assert predicted.peak_memory_upper_bytes == pytest.approx(
        peak_memory_upper_bytes(predicted.peak_memory_bytes, "cuda")
    )
    assert predicted.uncertainty_source == f"cuda: {residuals_of('cuda').source}"
    path = tmp_path / "plan.json"
    tiny_plan.to_json(path)
    assert Plan.from_json(path) == tiny_plan


def test_a_plan_written_before_intervals_still_loads_and_shows(tiny_plan, tmp_path):
    data = json.loads(tiny_plan.model_dump_json())
    for key in ("step_time_interval_s", "peak_memory_upper_bytes", "uncertainty_source"):
        del data["predicted"][key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = Plan.from_json(path)
    assert old.predicted.step_time_interval_s is None and old.predicted.peak_memory_upper_bytes is None
    assert "interval" not in explain(old) and report(old)["interval"] is None


def test_show_and_json_give_the_interval(tiny_plan):
    predicted = tiny_plan.predicted
    low, high = predicted.step_time_interval_s
    upper = predicted.peak_memory_upper_bytes
    text = explain(tiny_plan)
    line = next(line for line in text.splitlines() if line.startswith("interval"))
    assert line == (
        f"interval (cuda calibration residuals): step {low:.4g}-{high:.4g} s, peak memory at most "
        f"{upper / 1e9:.2f} GB (+{memory_margin('cuda'):.0%})"
    )
    assert max(len(line) for line in text.splitlines()) <= 100
    data = json.loads(json.dumps(report(tiny_plan)))  # what `autoplan show --json` writes
    assert data["interval"]["step_time_interval_s"] == pytest.approx([low, high])
    assert data["interval"]["peak_memory_upper_bytes"] == pytest.approx(upper)
    assert data["interval"]["source"] == predicted.uncertainty_source
    assert line in data["lines"]
