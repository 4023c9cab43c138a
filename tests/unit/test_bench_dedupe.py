"""`autoplan bench`: a plan identical to one already launched in the round is not launched again."""

from __future__ import annotations

import autoplan.runtime.launch as launch_module
from autoplan import ClusterSpec
from autoplan.bench.compare import run_bench


def test_identical_plans_launch_once_per_round(monkeypatch):
    launched = []

    def fake_launch(plan_path, model_name, **_):
        launched.append(plan_path)
        return {
            "median_step_s": 0.1 * len(launched),
            "step_times_s": [0.1 * len(launched)],
            "max_peak_memory_bytes": 1000,
            "peak_memory_bytes": [1000] * 4,
            "tokens_per_s": 10.0,
        }

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    report = run_bench("gpt-tiny", ClusterSpec.local(world_size=4), steps=1, progress=False, rounds=2)
    candidates = report["candidates"]
    distinct = {str([c["mesh"], c["plan"]]) for c in candidates}
    assert len(distinct) < len(candidates)  # the planner's choice is one of the baselines here
    assert len(launched) == 2 * len(distinct)
    by_plan = {}
    for entry in candidates:
        by_plan.setdefault(str([entry["mesh"], entry["plan"]]), set()).add(entry["measured_step_s"])
    assert all(len(times) == 1 for times in by_plan.values())
