"""`autoplan bench --rounds`: a candidate's rounds pooled into one entry."""

from __future__ import annotations

import statistics

from autoplan.bench.compare import _merge_round


def _entry(times: list[float] | None, peak: int | None, status: str = "ok") -> dict:
    median = statistics.median(times) if times else None
    return {
        "status": status,
        "measured_step_times_s": times,
        "measured_step_s": median,
        "measured_tokens_per_s": 1000 / median if median else None,
        "measured_mfu": 0.1 / median if median else None,
        "measured_peak_memory_bytes": peak,
        "measured_peak_memory_bytes_per_rank": [peak] if peak else None,
    }


def test_rounds_pool_every_step_and_keep_the_largest_peak():
    entry = _entry([1.0, 1.2, 1.1], 100)
    _merge_round(entry, _entry([2.0, 2.2, 0.9], 120))
    pooled = [1.0, 1.2, 1.1, 2.0, 2.2, 0.9]
    assert entry["measured_step_times_s"] == pooled
    assert entry["measured_step_s"] == statistics.median(pooled)
    assert entry["measured_tokens_per_s"] == 1000 / statistics.median(pooled)
    assert entry["measured_peak_memory_bytes"] == 120


def test_a_failed_round_is_reported_and_a_later_success_fills_in():
    entry = _entry(None, None, status="failed: rank 1 died")
    _merge_round(entry, _entry([0.5, 0.7], 80))
    assert entry["status"].startswith("failed")
    assert entry["measured_step_s"] == 0.6
    entry = _entry([0.5], 80)
    _merge_round(entry, _entry(None, None, status="failed: timeout"))
    assert entry["status"] == "failed: timeout" and entry["measured_step_s"] == 0.5


def test_identical_plans_share_their_pooled_steps():
    from autoplan.bench.compare import _pool_identical_plans

    plan = {"micro_batch_size": 2, "zero_stage": 0}
    chosen = {"name": "autoplan", "mesh": {"dp": 4}, "plan": dict(plan), **_entry([1.0, 1.2], 100)}
    ddp = {"name": "ddp", "mesh": {"dp": 4}, "plan": dict(plan), **_entry([0.8, 0.9], 100)}
    other = {"name": "fsdp", "mesh": {"dp": 4}, "plan": {**plan, "zero_stage": 3}, **_entry([2.0], 50)}
    _pool_identical_plans([chosen, ddp, other])
    assert chosen["measured_step_s"] == ddp["measured_step_s"] == statistics.median([1.0, 1.2, 0.8, 0.9])
    assert chosen["pooled_with"] == ["ddp"] and ddp["pooled_with"] == ["autoplan"]
    assert other["measured_step_s"] == 2.0 and "pooled_with" not in other
