"""`autoplan bench` end to end on local:2: planner, torchrun, measurement, JSON, figure."""

import json

import pytest

from autoplan import ClusterSpec, Constraints
from autoplan.bench.compare import baseline_constraints
from autoplan.bench.timeline import pipeline_timeline

pytestmark = pytest.mark.distributed  # starts ranks through torchrun

SCHEMA_KEYS = {
    "name",
    "chosen",
    "mesh",
    "constraints",
    "predicted_step_s",
    "measured_step_s",
    "predicted_peak_memory_bytes",
    "measured_peak_memory_bytes",
}


def test_bench_reports_every_candidate_and_goes_on_past_failures(tmp_path):
    pytest.importorskip(
        "autoplan.planner.planning", reason="the planner (autoplan.planner.planning.plan) has not landed yet"
    )
    from autoplan.bench.compare import run_bench

    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    report = run_bench(
        "gpt-tiny",
        ClusterSpec.local(world_size=2),
        steps=2,
        baselines=False,
        fixes=[Constraints(pp=2, dp=1, tp=1, schedule="1f1b", micro_batch_size=2), Constraints(tp=3)],
        json_path=str(json_path),
        plot_path=str(plot_path),
        progress=False,
    )
    assert json.loads(json_path.read_text()) == report
    assert plot_path.stat().st_size > 0
    assert report["model"] == "gpt-tiny" and report["steps"] == 2
    chosen, pipeline, impossible = report["candidates"]
    for entry in (chosen, pipeline):
        assert SCHEMA_KEYS <= set(entry) and entry["status"] == "ok", entry["status"]
        assert entry["measured_step_s"] > 0 and entry["predicted_step_s"] > 0
        assert len(entry["measured_peak_memory_bytes_per_rank"]) == 2
    assert chosen["chosen"] and not pipeline["chosen"]
    assert pipeline["mesh"] == {"dp": 1, "pp": 2, "tp": 1} and pipeline["constraints"]["pp"] == 2
    assert impossible["status"].startswith("failed: invalid: tp=3") and impossible["measured_step_s"] is None


def test_baselines_follow_the_cluster_shape():
    local = baseline_constraints(ClusterSpec.local(world_size=4))
    assert (local["ddp"].dp, local["fsdp"].zero_stage, local["pipeline"].pp) == (4, 3, 4)
    assert (local["megatron"].tp, local["megatron"].pp, local["megatron"].dp) == (2, 1, 2)
    dgx = baseline_constraints(ClusterSpec.preset("dgx-a100-80gb", num_nodes=4))
    assert (dgx["megatron"].tp, dgx["megatron"].pp, dgx["megatron"].dp) == (8, 4, 1)


@pytest.mark.parametrize(
    "schedule, expected_s",
    [("gpipe", (8 + 3) * 3.0), ("1f1b", (8 + 3) * 3.0), ("interleaved_1f1b", 8 * 3.0 + 3 * 3.0 / 2)],
)
def test_simulated_timeline_has_the_textbook_bubble(schedule, expected_s):
    """4 ranks, 8 micro-batches, 3 s forward+backward per rank: (m + p - 1) t, and the
    bubble divided by v = 2 with interleaving (Narayanan et al., SC21)."""
    stages = [3.0] * 4 if schedule != "interleaved_1f1b" else [1.5] * 8
    actions = pipeline_timeline(stages, pp=4, num_micro_batches=8, schedule=schedule)
    assert max(end for *_, end in actions) == pytest.approx(expected_s)
    assert len(actions) == 2 * 8 * len(stages)
