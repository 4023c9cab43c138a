"""Compute, communication and step-time formulas against hand arithmetic, plus properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoplan.costmodels.communication import (
    LINK_EFFICIENCY,
    OVERLAP_PENALTY,
    estimate_all_gather_s,
    estimate_all_reduce_s,
    estimate_p2p_s,
    estimate_reduce_scatter_s,
    exposed_s,
    group_levels,
)
from autoplan.costmodels.compute import estimate_layer_time, matmul_efficiency
from autoplan.costmodels.pipeline import bubble_speedup, pipeline_time_s
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.profile import LayerProfile

A100 = ClusterSpec.preset("dgx-a100-80gb", num_nodes=4)
NVLINK = 300e9 * LINK_EFFICIENCY
IB = 25e9 * LINK_EFFICIENCY


def test_ring_all_reduce_inside_a_node():
    expected = 2 * 7 / 8 * 1e9 / NVLINK + 2 * 7 * 3e-6
    assert estimate_all_reduce_s(1e9, group_levels(A100, size=8, stride=1)) == pytest.approx(expected)


def test_all_gather_and_reduce_scatter_are_half_an_all_reduce():
    levels = group_levels(A100, size=4, stride=1)
    expected = 3 / 4 * 1e9 / NVLINK + 3 * 3e-6
    assert estimate_all_gather_s(1e9, levels) == pytest.approx(expected)
    assert estimate_reduce_scatter_s(1e9, levels) == pytest.approx(expected)


def test_hierarchical_all_reduce_across_nodes():
    # 32 ranks, stride 1: 8 inside each node over NVLink (a ring), then 4 nodes over IB on 1/8 of
    # the bytes, on NCCL's tree: 2 log2(4) latencies, not a ring's 2 * 3
    levels = group_levels(A100, size=32, stride=1)
    assert [(n, link.bandwidth_gbps) for n, link in levels] == [(8, 300.0), (4, 25.0)]
    expected = 2 * 7 / 8 * 1e9 / NVLINK + 2 * 3 / 4 * (1e9 / 8) / IB + 2 * 7 * 3e-6 + 2 * 2 * 5e-6
    assert estimate_all_reduce_s(1e9, levels) == pytest.approx(expected)
    # all-gather and reduce-scatter stay rings; so does gloo's all-reduce on CPU ranks
    ring = [(4, levels[1][1].model_copy(update={"tree_all_reduce": False}))]
    assert estimate_all_reduce_s(0.0, ring) == pytest.approx(2 * 3 * 5e-6)
    assert estimate_all_gather_s(0.0, levels[1:]) == pytest.approx(3 * 5e-6)
    # over 1024 nodes a tree all-reduce pays 20 latencies where a ring paid 2046
    wide = group_levels(ClusterSpec.preset("dgx-a100-80gb", num_nodes=1024), size=1024, stride=8)
    assert estimate_all_reduce_s(0.0, wide) == pytest.approx(2 * 10 * 5e-6)


def test_axis_placement():
    # tp innermost stays in the node; dp with stride 8 (tp = 8) crosses nodes entirely
    assert [(n, link.bandwidth_gbps) for n, link in group_levels(A100, size=8, stride=1)] == [(8, 300.0)]
    assert [(n, link.bandwidth_gbps) for n, link in group_levels(A100, size=4, stride=8)] == [(4, 25.0)]
    assert [(n, link.bandwidth_gbps) for n, link in group_levels(A100, size=4, stride=2)] == [(4, 300.0)]
    assert group_levels(A100, size=1, stride=1) == []


def test_p2p():
    assert estimate_p2p_s(1e8, A100.inter_node) == pytest.approx(1e8 / IB + 5e-6)


def layer(fwd_flops=1e12, tp_fraction=1.0, elementwise=0.0, **extra) -> LayerProfile:
    return LayerProfile(
        name="l",
        signature="s",
        param_count=10,
        fwd_flops=fwd_flops,
        bwd_flops=2 * fwd_flops,
        tp_flops_fraction=tp_fraction,
        elementwise_bytes=elementwise,
        saved_bytes={"none": 100.0},
        tp_saved_bytes={"none": 50.0},
        output_bytes=0.0,
        **extra,
    )


def test_roofline_matmul_time():
    device = A100.device
    time = estimate_layer_time(
        layer(), device, micro_batch_size=2, tp=1, sequence_parallel=False, recompute="none", compute_dtype="bfloat16"
    )
    efficiency = device.matmul_efficiency * 2e12 / (2e12 + 2e9)
    assert time.forward_s == pytest.approx(2e12 / (312e12 * efficiency))
    assert time.backward_s == pytest.approx(2 * time.forward_s)
    assert time.recompute_s == 0.0


def test_tp_divides_only_its_fraction_and_full_recompute_repeats_forward():
    device = A100.device
    half = estimate_layer_time(
        layer(tp_fraction=0.5),
        device,
        micro_batch_size=1,
        tp=4,
        sequence_parallel=False,
        recompute="full",
        compute_dtype="bfloat16",
    )
    flops = 1e12 * (0.5 / 4 + 0.5)
    assert half.forward_s == pytest.approx(flops / (312e12 * matmul_efficiency(flops, device)))
    assert half.recompute_s == pytest.approx(half.forward_s)


def test_fused_attention_runs_its_causal_share_at_the_attention_efficiency():
    # half of a 1 TFLOP forward is causal attention, of which the kernel runs half; on an H100
    # a GEMM reaches 0.7 of peak, FlashAttention-2 0.35 (costmodels/devices.py)
    h100 = ClusterSpec.preset("dgx-h100").device
    attention = layer(attention_fwd_flops=0.5e12, attention_bwd_flops=1e12, attention_run_fraction=0.5)
    kwargs = dict(micro_batch_size=1, tp=1, sequence_parallel=False, recompute="none", compute_dtype="bfloat16")
    time = estimate_layer_time(attention, h100, **kwargs)
    size = matmul_efficiency(1e12, h100) / h100.matmul_efficiency  # the same size curve for both
    gemm_rate, attention_rate = 989.5e12 * 0.7 * size, 989.5e12 * 0.35 * size
    assert time.forward_s == pytest.approx(0.5e12 / gemm_rate + 0.5e12 * 0.5 / attention_rate)
    assert time.backward_s == pytest.approx(1e12 / gemm_rate + 1e12 * 0.5 / attention_rate)
    # counted whole at the GEMM rate, as before: the same seconds here (half the FLOPs at half the rate)
    assert estimate_layer_time(layer(), h100, **kwargs).forward_s == pytest.approx(time.forward_s)
    # a device without its own attention efficiency (CPU ranks) prices the kernel's FLOPs as GEMMs
    plain = h100.model_copy(update={"attention_efficiency": None})
    assert estimate_layer_time(attention, plain, **kwargs).forward_s == pytest.approx(0.75e12 / gemm_rate)


def test_elementwise_is_memory_bound():
    device = A100.device
    time = estimate_layer_time(
        layer(fwd_flops=0.0, elementwise=4e9),
        device,
        micro_batch_size=1,
        tp=1,
        sequence_parallel=False,
        recompute="selective",
        compute_dtype="bfloat16",
    )
    elementwise = 2e9 / (2039e9 * device.memory_efficiency)  # bf16 halves the float32 bytes
    assert time.forward_s == pytest.approx(elementwise, rel=1e-6)
    assert time.recompute_s == pytest.approx(elementwise, rel=1e-6)
    assert time.backward_s == pytest.approx(2 * elementwise, rel=1e-6)


def test_host_work_is_paid_per_op_whatever_the_batch_or_tp_split():
    cpu = ClusterSpec.local(4).device.model_copy(update={"op_overhead_us": 20.0})
    block = layer(fwd_flops=1e9, elementwise=1e6).model_copy(update={"forward_ops": 30, "backward_ops": 70})
    options = dict(sequence_parallel=False, recompute="none", compute_dtype="float32")
    for micro_batch_size, tp in ((1, 1), (4, 1), (2, 2)):
        with_host = estimate_layer_time(block, cpu, micro_batch_size=micro_batch_size, tp=tp, **options)
        without = estimate_layer_time(
            block, cpu.model_copy(update={"op_overhead_us": 0.0}), micro_batch_size=micro_batch_size, tp=tp, **options
        )
        assert with_host.forward_s - without.forward_s == pytest.approx(30 * 20e-6)
        assert with_host.backward_s - without.backward_s == pytest.approx(70 * 20e-6)
    assert ClusterSpec.preset("dgx-a100-80gb").device.op_overhead_us == 0.0  # runs ahead of the kernels


def test_measured_times_replace_the_roofline():
    measured = layer(measured_fwd_s=0.01, measured_bwd_s=0.02, measured_device=A100.device.name)
    time = estimate_layer_time(
        measured,
        A100.device,
        micro_batch_size=3,
        tp=2,
        sequence_parallel=False,
        recompute="none",
        compute_dtype="bfloat16",
    )
    assert (time.forward_s, time.backward_s) == pytest.approx((0.03 / 2, 0.06 / 2))


def test_pipeline_formula():
    config = ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=1, num_micro_batches=8)
    # (m - 1) * max + sum for 1F1B, plus 2 p2p per micro-batch and boundary
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], config, 0.0) == pytest.approx(7 * 2 + 5)
    interleaved = ParallelConfig(
        mesh={"dp": 1, "pp": 4, "tp": 1},
        micro_batch_size=1,
        num_micro_batches=8,
        schedule="interleaved_1f1b",
        virtual_stages=2,
    )
    assert pipeline_time_s([1.0] * 4, interleaved, 0.1) == pytest.approx(8 + 3 / 2 + 2 * 0.1 * (16 + 3))


def test_overlap():
    assert exposed_s(1.0, 3.0) == pytest.approx(OVERLAP_PENALTY)
    assert exposed_s(3.0, 1.0) == pytest.approx((1 - OVERLAP_PENALTY) * 2 + OVERLAP_PENALTY * 3)


sizes = st.floats(min_value=1.0, max_value=1e12, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(num_bytes=sizes, extra=sizes, size=st.sampled_from([2, 4, 8, 16, 32]), stride=st.sampled_from([1, 2, 8]))
def test_collectives_positive_finite_monotone(num_bytes, extra, size, stride):
    levels = group_levels(A100, size=size, stride=stride)
    for estimate in (estimate_all_reduce_s, estimate_all_gather_s, estimate_reduce_scatter_s):
        small, large = estimate(num_bytes, levels), estimate(num_bytes + extra, levels)
        assert 0 < small <= large and math.isfinite(large)


@settings(max_examples=50, deadline=None)
@given(flops=st.floats(min_value=1e3, max_value=1e16), mbs=st.integers(1, 64), tp=st.sampled_from([1, 2, 4, 8]))
def test_layer_time_positive_finite_monotone(flops, mbs, tp):
    device = A100.device
    kwargs = dict(tp=tp, sequence_parallel=False, recompute="none", compute_dtype="bfloat16")
    small = estimate_layer_time(layer(fwd_flops=flops), device, micro_batch_size=mbs, **kwargs).total_s
    large = estimate_layer_time(layer(fwd_flops=flops), device, micro_batch_size=mbs + 1, **kwargs).total_s
    assert 0 < small <= large and math.isfinite(large)


# --- ranks sharing CPU cores, per-call collective costs, DDP buckets, Adam traffic ---------------
def _local(**device) -> ClusterSpec:
    data = ClusterSpec.local(world_size=4).model_dump()
    data["device"].update(device)
    data["intra_node"].update(bandwidth_gbps=1.0, latency_us=100.0, collective_overhead_us=2000.0)
    data["inter_node"] = dict(data["intra_node"])
    return ClusterSpec.model_validate(data)


def test_shared_cores_pipeline_is_bound_by_work_or_critical_path():
    config = ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=1, num_micro_batches=8)
    # all-busy stage times 1, 2, 1, 1 on cores shared two ranks to a core (s = 2): the cores
    # do 8 * (1 + 2 + 1 + 1) all-busy seconds over 4 ranks = 10 s; the slowest stage alone
    # (2 / 2 = 1 s a micro-batch) plus the others' bubble at alone speed is 8 + 3 / 2 = 9.5 s
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], config, 0.0, bubble_speedup=2.0) == pytest.approx(10.0)
    # a few micro-batches over many stages: the critical path binds, (2 * 2 + 3) / 2 = 3.5 s
    short = ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=1, num_micro_batches=2)
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], short, 0.0, bubble_speedup=2.0) == pytest.approx(3.5)
    # sends: on shared cores only the first micro-batch's trip there and back (2 (p - 1) = 6 sends)
    # delays the critical path, a waiting rank's core runs the others; on GPUs all 2 (m + p - 1)
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], config, 0.1, 2.0, shared_cores=True) == pytest.approx(9.5 + 0.6)
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], config, 0.1) == pytest.approx(7 * 2 + 5 + 22 * 0.1)
    # a waiting rank's peer gets a core of its own, not the calibrated all-busy slowdown's whole
    # factor (the ranks still share caches and memory), and never more than that slowdown
    assert bubble_speedup(_local(shared_core_slowdown=2.5, ranks_per_core=2.0).device) == 2.0
    assert bubble_speedup(_local(shared_core_slowdown=1.5, ranks_per_core=2.0).device) == 1.5
    # on a GPU (s = 1) the critical path always binds: (m - 1) * max + sum
    assert pipeline_time_s([1.0, 2.0, 1.0, 1.0], config, 0.0) == pytest.approx(7 * 2 + 5)


def test_collective_overhead_is_paid_once_per_call():
    cluster = _local()
    levels = group_levels(cluster, size=4, stride=1)
    bandwidth = 1e9 * LINK_EFFICIENCY
    assert estimate_all_reduce_s(1e6, levels) == pytest.approx(2 * 3 / 4 * 1e6 / bandwidth + 6 * 100e-6 + 2e-3)
    # a pipeline's receives are posted ahead: a send waits for one peer, not for a group
    assert estimate_p2p_s(1e6, cluster.intra_node) == pytest.approx(1e6 / bandwidth + 100e-6)
    loaded = cluster.intra_node.model_copy(update={"p2p_overhead_us": 700.0})
    assert estimate_p2p_s(1e6, loaded) == pytest.approx(1e6 / bandwidth + 100e-6 + 700e-6)


def test_cpu_ranks_expose_all_communication():
    from autoplan.costmodels.pipeline import overlap_penalty

    assert overlap_penalty(_local()) == 1.0
    assert exposed_s(1.0, 3.0, overlap_penalty(_local())) == pytest.approx(1.0)
    assert overlap_penalty(A100) == OVERLAP_PENALTY


def test_ddp_buckets_replace_per_layer_latency():
    from autoplan.costmodels.pipeline import DDP_BUCKET_BYTES, dp_sync_coefficients

    cluster = _local()
    ddp = ParallelConfig(mesh={"dp": 4, "pp": 1, "tp": 1}, micro_batch_size=1, num_micro_batches=1)
    per_param, per_layer = dp_sync_coefficients(cluster, ddp, 0)
    ring_byte = 2 * 3 / 4 / (1e9 * LINK_EFFICIENCY)
    call = 6 * 100e-6 + 2e-3
    assert per_layer == 0.0
    assert per_param == pytest.approx(4 * (ring_byte + call / DDP_BUCKET_BYTES))
    # with a pipeline the stage modules sync per layer (replicate_with_fsdp)
    staged = ParallelConfig(mesh={"dp": 2, "pp": 2, "tp": 1}, micro_batch_size=1, num_micro_batches=2)
    per_param, per_layer = dp_sync_coefficients(cluster, staged, 0)
    assert per_layer == pytest.approx(2 * 100e-6 + 2e-3)


def test_adam_traffic_is_the_devices_constant():
    from autoplan.costmodels.compute import estimate_optimizer_step_s

    cluster = _local(adam_bytes_per_param=64.0, memory_bandwidth_gbps=8.0, memory_efficiency=1.0)
    assert estimate_optimizer_step_s(1e6, cluster.device, "float32") == pytest.approx(64e6 / 8e9)


def _tp_block() -> LayerProfile:
    from autoplan.schema.plan import TPSite

    sites = {
        "b.attn.qkv": TPSite(style="colwise"),
        "b.attn.o": TPSite(style="rowwise"),
        "b.mlp.fc": TPSite(style="colwise"),
        "b.mlp.proj": TPSite(style="rowwise"),
        "b.ln_1": TPSite(style="sequence_parallel"),
        "b.ln_2": TPSite(style="sequence_parallel"),
    }
    return LayerProfile(
        name="b",
        signature="s",
        param_count=10,
        fwd_flops=1e9,
        bwd_flops=2e9,
        saved_bytes={"none": 100.0, "full": 10.0},
        tp_saved_bytes={"none": 50.0, "full": 5.0},
        output_bytes=0.0,
        tp_allreduce_bytes_fwd=2e6,
        tp_allreduce_bytes_bwd=2e6,
        tp_sites=sites,
    )


def _tp_comm_s(cluster: ClusterSpec, sequence_parallel: bool, recompute: str = "none") -> float:
    from autoplan.costmodels.layer import estimate_layer_cost

    return estimate_layer_cost(
        _tp_block(),
        recompute,
        cluster,
        dp=2,
        tp=2,
        micro_batch_size=1,
        sequence_parallel=sequence_parallel,
        param_dtype="float32",
        grad_reduce_dtype="float32",
    ).tp_comm_s


def test_sequence_parallel_pays_two_calls_per_site():
    # 2 all-reduces forward (rowwise) and 2 backward (colwise groups) of 1 MB each; with
    # sequence parallelism each is a reduce-scatter + an all-gather: same bytes and ring
    # steps, one more 2 ms call overhead
    cluster = _local(tp_dispatch_overhead_us=0.0)
    call = 2 * 100e-6 + 2e-3  # an all-reduce on 2 ranks: 2 ring steps + the call
    all_reduce = 2 * 1 / 2 * 1e6 / (1e9 * LINK_EFFICIENCY) + call
    assert _tp_comm_s(cluster, False) == pytest.approx(4 * all_reduce)
    assert _tp_comm_s(cluster, True) == pytest.approx(4 * (all_reduce + 2e-3))


def test_dtensor_dispatch_is_paid_per_site():
    base, with_dispatch = _local(tp_dispatch_overhead_us=0.0), _local(tp_dispatch_overhead_us=1000.0)
    # 4 Linear sites; the 2 norms are DTensors only under sequence parallelism
    assert _tp_comm_s(with_dispatch, False) - _tp_comm_s(base, False) == pytest.approx(4e-3)
    assert _tp_comm_s(with_dispatch, True) - _tp_comm_s(base, True) == pytest.approx(6e-3)
    # full recompute runs the forward (half the dispatch) again
    assert _tp_comm_s(with_dispatch, False, "full") - _tp_comm_s(base, False, "full") == pytest.approx(4e-3 * 1.5)


def test_optimizer_pays_dtensor_host_time_per_parameter_tensor_where_params_are_dtensors():
    from autoplan.costmodels.pipeline import estimate_step, params_are_dtensors
    from autoplan.schema.profile import ModelProfile

    ddp = ParallelConfig(mesh={"dp": 4, "pp": 1, "tp": 1}, micro_batch_size=2, num_micro_batches=1)
    assert not params_are_dtensors(ddp, 0)  # DDP's reducer keeps plain tensors
    assert params_are_dtensors(ddp, 1) and params_are_dtensors(ddp, 3)  # FSDP2 shards
    staged = ParallelConfig(mesh={"dp": 2, "pp": 2, "tp": 1}, micro_batch_size=2, num_micro_batches=2)
    assert params_are_dtensors(staged, 0)  # replicate_with_fsdp beside a pipeline
    assert params_are_dtensors(
        ParallelConfig(mesh={"dp": 1, "pp": 1, "tp": 4}, micro_batch_size=2, num_micro_batches=1), 0
    )
    assert not params_are_dtensors(
        ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=2, num_micro_batches=4), 0
    )

    blocks = [layer(fwd_flops=1e6, param_tensors=5) for _ in range(3)]
    profile = ModelProfile(
        model_name="m",
        layers=blocks,
        global_batch_size=8,
        seq_len=1,
        input_bytes=0.0,
        fingerprint="f",
        num_params=30,
        model_flops_per_sequence=0.0,
    )
    rank_layers = [[(i, "none") for i in range(3)]]

    def optimizer_s(cluster: ClusterSpec, zero: int) -> float:
        config = ParallelConfig(
            mesh={"dp": 4, "pp": 1, "tp": 1}, micro_batch_size=2, num_micro_batches=1, zero_stage=zero
        )
        return estimate_step(profile, cluster, config, rank_layers).breakdown["optimizer_s"]

    base, charged = _local(dtensor_param_step_us=0.0), _local(dtensor_param_step_us=400.0)
    assert optimizer_s(charged, 3) - optimizer_s(base, 3) == pytest.approx(15 * 400e-6)
    assert optimizer_s(charged, 0) == pytest.approx(optimizer_s(base, 0))


def test_step_collectives_loss_first_ddp_bucket_and_tied_gradients():
    from autoplan.costmodels.pipeline import step_collectives_s
    from autoplan.schema.profile import ModelProfile

    cluster = _local()  # 1 GB/s, 100 us latency, 2 ms per collective call
    embed = layer(fwd_flops=1e6).model_copy(update={"name": "embed", "param_count": 1_000_000})
    head = layer(fwd_flops=1e6).model_copy(update={"name": "head", "param_count": 0})
    profile = ModelProfile(
        model_name="m",
        layers=[embed, head],
        global_batch_size=8,
        seq_len=1,
        input_bytes=0.0,
        fingerprint="f",
        num_params=1_000_000,
        model_flops_per_sequence=0.0,
        tied_parameters=[["embed.weight", "head.weight"]],
    )
    bandwidth = 1e9 * LINK_EFFICIENCY
    call_4 = 6 * 100e-6 + 2e-3  # all-reduce on 4 ranks: 6 ring steps + the call
    ddp = ParallelConfig(mesh={"dp": 4, "pp": 1, "tp": 1}, micro_batch_size=2, num_micro_batches=1)
    loss = 2 * 3 / 4 * 4 / bandwidth + call_4
    assert step_collectives_s(profile, cluster, ddp) == pytest.approx(loss + call_4)  # + DDP's first bucket
    fsdp = ParallelConfig(mesh={"dp": 4, "pp": 1, "tp": 1}, micro_batch_size=2, num_micro_batches=1, zero_stage=3)
    assert step_collectives_s(profile, cluster, fsdp) == pytest.approx(loss)
    pipeline = ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=2, num_micro_batches=4)
    broadcast = 3 / 4 * 4 / bandwidth + 3 * 100e-6 + 2e-3
    tied = 2 * 1 / 2 * 4e6 / bandwidth + 2 * 100e-6 + 2e-3  # 1 M fp32 gradients between two stages
    assert step_collectives_s(profile, cluster, pipeline) == pytest.approx(broadcast + tied)
