"""Float8 matmuls: the cost model's speed-up against torchtitan's float8 rows (vendored in
tests/data/torchtitan_float8.json), planning on devices with and without float8, the Plan's
per-layer matmul_dtype, and the torchao module swap on CPU (the matmuls themselves need CUDA
sm89+)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from autoplan.analysis.profile import profile_model
from autoplan.backends.float8 import apply_float8_matmuls, float8_linear_paths, float8_unavailable, swap_to_float8
from autoplan.planner.planning import plan_from_profile
from autoplan.planner.solver import solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.zoo import build

ROWS = {
    row["id"]: row
    for row in json.loads((Path(__file__).parents[1] / "data" / "torchtitan_float8.json").read_text())["runs"]
}
SPEED_UP_RTOL = 0.08
"""Predicted vs published float8 speed-up. The 128-GPU pair sits at -7.0% (1.196 vs 1.286): the
FSDP2 term charges OVERLAP_PENALTY of the hidden all-gathers, which float8 does not shrink, while
torchtitan's 8- and 128-GPU pairs speed up alike (1.280, 1.286): docs/validation_torchtitan.md."""
"""Predicted float8 speed-up (tokens/s ratio) against torchtitan's, each pair of rows."""
PAIRS = [  # (bf16 row, float8 row, zoo model); FLOAT8_MATMUL_EFFICIENCY is fitted to the first
    ("h100_2412_T1_8b_8gpu_fsdp_compile", "h100_2412_T1_8b_8gpu_fsdp_compile_fp8", "llama3-8b"),
    ("h100_2412_T3_8b_128gpu_fsdp_compile", "h100_2412_T3_8b_128gpu_fsdp_compile_fp8", "llama3-8b"),
    (
        "h100_2506_asynctp_8b_64gpu_bf16_vanillatp",
        "h100_2506_asynctp_8b_64gpu_float8_tensorwise_vanillatp",
        "llama3-8b",
    ),
    (
        "h100_2506_asynctp_70b_256gpu_bf16_vanillatp",
        "h100_2506_asynctp_70b_256gpu_float8_tensorwise_vanillatp",
        "llama3-70b",
    ),
]


def _profile(model: str, global_batch: int, seq_len: int):
    job = build(model, batch_size=global_batch, seq_len=seq_len, device="meta")
    return profile_model(job.module, job.example_inputs, model_name=model, loss_fn=job.loss_fn)


@pytest.mark.parametrize("bf16_id, float8_id, model", PAIRS)
def test_float8_speed_up_matches_torchtitan(bf16_id, float8_id, model):
    row = ROWS[bf16_id]
    profile = _profile(model, row["gbs"], row["seq"])
    recompute = "full" if row["recompute"].startswith("full") else "selective"
    pins = dict(dp=row["dp"], tp=row["tp"], pp=1, micro_batch_size=row["local_batch_size"], zero_stage=3)
    # the published runs fit; time is what this checks, so memory does not bind (the layers
    # outside the blocks keep their activations, as in torchtitan)
    cluster = ClusterSpec.preset("dgx-h100", num_nodes=row["gpus"] // 8, memory_bytes=10**15)
    bf16, float8 = (
        solve(profile, cluster, Constraints(recompute=recompute, matmul_dtype=dtype, **pins)).best.estimate.step_time_s
        for dtype in (None, "float8_e4m3fn")
    )
    measured = ROWS[float8_id]["tokens_per_s_per_gpu"] / row["tokens_per_s_per_gpu"]
    assert bf16 / float8 == pytest.approx(measured, rel=SPEED_UP_RTOL)


def test_float8_is_planned_where_the_device_has_it_and_allowed():
    profile = _profile("llama3-8b", 16, 2048)
    h100 = plan_from_profile(profile, ClusterSpec.preset("dgx-h100"), Constraints(allow_lossy=True))
    float8 = h100.matmul_dtype_of()
    assert float8 and all(name.startswith("layers.") for name in float8)
    assert set(float8.values()) == {"float8_e4m3fn"}
    assert h100.layers[-1].matmul_dtype == "bfloat16"  # the output head stays
    exact = plan_from_profile(profile, ClusterSpec.preset("dgx-h100"))
    assert not exact.matmul_dtype_of() and h100.predicted.step_time_s < exact.predicted.step_time_s
    a100 = plan_from_profile(profile, ClusterSpec.preset("dgx-a100-80gb"), Constraints(allow_lossy=True))
    assert not a100.matmul_dtype_of()
    with pytest.raises(ValueError, match=r"device A100-SXM4-80GB \(cuda\) multiplies in bfloat16, float16, float32"):
        solve(profile, ClusterSpec.preset("dgx-a100-80gb"), Constraints(matmul_dtype="float8_e4m3fn"))


def test_module_swap_on_cpu_keeps_names_and_only_the_planned_layers():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    job = build("llama-tiny", batch_size=2, device="cpu")
    names = [name for name, _ in job.module.named_parameters()]
    paths = swap_to_float8(job.module, ["layers.0", "layers.1"])
    assert paths == sorted(float8_linear_paths(job.module, ["layers.0", "layers.1"])) and paths
    assert all(isinstance(job.module.get_submodule(path), Float8Linear) for path in paths)
    assert all(path.startswith(("layers.0.", "layers.1.")) for path in paths)
    assert not isinstance(job.module.output, Float8Linear)
    assert [name for name, _ in job.module.named_parameters()] == names


def test_float8_refuses_to_run_without_float8_tensor_cores():
    problem = float8_unavailable()
    if problem is None:
        pytest.skip("this machine has float8 tensor cores")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        apply_float8_matmuls(nn.Sequential(nn.Linear(4, 4)), ["0"])
