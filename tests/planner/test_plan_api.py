"""plan() end to end: a zoo model through the profiler, a 1024-rank plan that maps onto a
real DeviceMesh under the fake process group, and the report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from autoplan import zoo
from autoplan.planner.planning import build_plan, plan
from autoplan.planner.report import explain
from autoplan.planner.solver import solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
MEGATRON_SC21 = Path(__file__).resolve().parents[1] / "data" / "megatron_sc21.json"
"""Tables 1 and 2 of Narayanan et al. (SC21), vendored (tests/data/README.md)."""


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_layout(result: Plan, num_layers: int) -> None:
    pp, v = result.mesh["pp"], result.virtual_stages
    assert len(result.stages) == pp * v
    assert [s.pp_rank for s in result.stages] == [i % pp for i in range(pp * v)]
    names = [name for stage in result.stages for name in stage.layers]
    assert names == [layer.name for layer in result.layers] and len(names) == num_layers
    assert result.mesh["dp"] * result.mesh["pp"] * result.mesh["tp"] == result.cluster.world_size


def test_plan_zoo_model_and_explain(tmp_path):
    job = zoo.build("gpt-tiny", batch_size=8, device="meta")
    result = plan(
        job.module,
        ClusterSpec.local(world_size=4),
        job.example_inputs,
        loss_fn=job.loss_fn,
        constraints=Constraints(pp=2),
        model_name="gpt-tiny",
    )
    check_layout(result, len(result.layers))
    assert result.mesh["pp"] == 2
    assert result.predicted.step_time_s > 0 and result.predicted.tokens_per_s > 0
    assert any(name.endswith("_s") for name in result.predicted.breakdown)
    assert any(name.endswith("_bytes") for name in result.predicted.breakdown)
    result.to_json(tmp_path / "plan.json")
    report = explain(Plan.from_json(tmp_path / "plan.json"))
    for heading in (
        "stages",
        "per-layer choices",
        "time per step, worst rank",
        "memory, worst rank",
        "runners-up",
        "why it lost",
    ):
        assert heading in report


def test_plan_rejects_a_dtype_the_device_cannot_run_before_profiling():
    job = zoo.build("gpt-tiny", batch_size=8, device="meta")
    with pytest.raises(ValueError, match=r"matmul_dtype=float8_e4m3fn needs float8 tensor cores .* device cpu \(cpu\)"):
        plan(
            job.module,
            ClusterSpec.local(world_size=2),
            job.example_inputs,
            constraints=Constraints(matmul_dtype="float8_e4m3fn"),
        )


def test_1024_rank_plan_maps_onto_a_device_mesh():
    megatron = load_benchmark("megatron_sc21")
    profile = megatron.gpt_profile(layers=24, hidden=2048, heads=16, global_batch=1024)
    cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=128)
    result = build_plan(profile, cluster, solve(profile, cluster, Constraints(tp=4, pp=2)))
    check_layout(result, len(profile.layers))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1024)
    try:
        mesh = init_device_mesh(
            "cpu", (result.mesh["pp"], result.mesh["dp"], result.mesh["tp"]), mesh_dim_names=("pp", "dp", "tp")
        )
        assert mesh["tp"].size() == 4 and mesh["pp"].size() == 2 and mesh["dp"].size() == 128
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("row_index", [0, 4, 6])
def test_megatron_table1_rows(row_index):
    """Pinned prediction within 15% of the published TFLOP/s; the free plan is no slower."""
    import json

    megatron = load_benchmark("megatron_sc21")
    row = json.loads(MEGATRON_SC21.read_text())["table1_weak_scaling"][row_index]
    result = megatron.evaluate_table1_row(row, free=True)
    assert abs(result["tflops"] / row["tflops"] - 1) <= 0.15
    assert result["free_tflops"] >= result["tflops"] * (1 - 1e-9)


def test_megatron_table2_ordering_175b_384():
    import json

    megatron = load_benchmark("megatron_sc21")
    rows = json.loads(MEGATRON_SC21.read_text())["table2_ptdp_vs_zero3"]["rows"]
    zero, ptdp = next(pair for pair in megatron.table2_pairs(rows) if pair[0]["gpus"] == 384)
    assert megatron.evaluate_table2_row(zero) < megatron.evaluate_table2_row(ptdp)
