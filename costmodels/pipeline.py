"""Step time of a plan: stage times, pipeline schedule, data-parallel sync, optimizer.

Per pipeline rank i and micro-batch (b sequences per data-parallel rank):
    T_i = sum over its layers of forward + backward + recompute + tp collectives
          (all-reduce of tp_allreduce_bytes_{fwd,bwd} * b over the tp group; full
          recompute repeats the forward all-reduce; sequence parallelism moves the same
          volume as reduce-scatter + all-gather, so the same time)
    ZeRO-3 adds, per micro-batch, all-gather of the rank's parameters in forward and
    again in backward plus a reduce-scatter of its gradients, overlapped layer by layer
    as FSDP2 prefetches (`layer.fsdp_exposed_s`):
          X_i = sum over its layers of exposed(all-gather, forward)
                                     + exposed(all-gather + reduce-scatter, backward)
Pipeline with m micro-batches, p ranks, v chunks per rank (v = 1 except interleaved),
B_i = T_i + X_i:
    pipeline = max((m * max_i B_i + (sum_i B_i - max_i B_i) / v) / r + ramp * p2p,  m * sum_i B_i / p)
               + outright * p2p                                         (p > 1)
On GPUs r = 1, ramp = 0 and the first term, (m - 1) * max + sum for GPipe/1F1B (bubble
(p-1)/m, Narayanan et al. SC21) and the bubble divided by v for interleaved 1F1B, is always
the larger; every point-to-point send (the boundary activation, forward, and its gradient,
backward) is charged outright, outright = 2 (m v + p - 1): interleaving sends v times as often.
On ranks that share cores a rank waiting for a message gives its core to the others, so a
send delays the step only where nothing else can run: on the ramp, the first micro-batch's
trip through the p v stages and back, ramp = 2 (p v - 1), outright = 0. The custom model's
4-stage pipeline on local:4 measured 68 ms per step; charging its 14 sends of ~3 ms outright
predicted 94 ms and the planner took DDP (1.26 x the best measured).
Ranks that share CPU cores are timed all busy (`device.shared_core_slowdown` s slower than
alone). A rank whose peers wait (the bubble, or the stages faster than the slowest) gets a
core of its own and runs r = `bubble_speedup` = min(s, device.ranks_per_core) times faster,
so the schedule's critical path is the first term at that speed; and the cores cannot do
more than the pipeline's work, m * sum_i B_i of all-busy time spread over its p ranks: the
second term. Not s faster: the ranks still running share the caches and memory with it.
gpt-small-demo as 4 stages on local:4 (2 cores, s = 2.5 calibrated) measured 0.62 s per step
with m = 2 and 0.48 s with m = 4; dividing the critical path by s predicted 0.47 and 0.53 s
(the planner took m = 2, 1.29 x the best), by r = 2 it predicts 0.58 and 0.53 s
(benchmarks/bench_local.py).
Then each rank synchronises gradients over dp and steps its optimizer, and the runner
reports the loss (`step_collectives_s`):
    step = pipeline + max_i (exposed(sync_i, backward_i) + optimizer_i) + step collectives
    sync_i: ZeRO 0 all-reduce of the rank's gradients (grad_reduce_dtype);
            ZeRO 1/2 reduce-scatter of gradients + all-gather of the updated params;
            ZeRO 3 nothing more (done per micro-batch).
    ZeRO collectives run as one flat ring over the dp group (communication.flat_levels).
The sync overlaps with the last micro-batch's backward (backward_i):
    exposed(c, w) = (1 - OVERLAP_PENALTY) * max(0, c - w) + OVERLAP_PENALTY * c
The hidden part is not free: NCCL kernels share SMs and HBM bandwidth with the
compute they overlap. On a device that does not overlap communication
(`device.overlaps_communication` False: CPU ranks, whose gloo collectives share the cores)
the penalty is 1 and every collective is exposed.

Every collective pays its latency: the backends issue one data-parallel collective per
layer holding parameters (FSDP2 units), and per tensor-parallel site (`tp_collectives`):
an all-reduce after each rowwise Linear / vocab-split embedding or output in forward, one
per group of colwise Linears reading one tensor in backward. Sequence parallelism splits
each of these all-reduces into a reduce-scatter and an all-gather: the same bytes, twice
the calls (`tp_site_comm_s`). Each site also pays DTensor's host time per micro-batch,
`device.tp_dispatch_overhead_us` (`tp_dispatch_s`; 0 on GPUs, measured on CPU ranks).

`estimate_step` evaluates one fully specified plan (mesh, micro-batch, schedule,
ZeRO, sequence parallelism, layers per rank with their recompute option); the MILP in
`autoplan.planner.solver` optimises exactly this function (its per-layer coefficients come
from `costmodels.layer.estimate_layer_cost`), and the planner tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autoplan.costmodels.communication import (
    collective_coefficients,
    estimate_all_reduce_s,
    estimate_collective_s,
    estimate_p2p_s,
    exposed_s,
    flat_levels,
    group_levels,
    overlap_penalty,
    pipeline_link,
)
from autoplan.costmodels.compute import DTYPE_BYTES, estimate_optimizer_step_s
from autoplan.costmodels.layer import config_layer_cost
from autoplan.costmodels.memory import (
    allocator_reserve_bytes,
    estimate_comm_buffer_bytes,
    estimate_model_state_bytes,
    estimate_transient_bytes,
    estimate_zero3_gathered_bytes,
    in_flight_micro_batches,
    local_param_count,
)
from autoplan.schema.cluster import ClusterSpec, DeviceSpec
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.profile import LayerProfile, ModelProfile

DDP_BUCKET_BYTES = 25 * 1024**2
"""DistributedDataParallel's default bucket_cap_mb (25 MiB)."""


def uses_ddp_buckets(config: ParallelConfig, zero_stage: int) -> bool:
    """Whether the backend syncs gradients with DistributedDataParallel's reducer
    (`backends.data_parallel`: ZeRO 0, no tp, no pipeline, float32 parameters, gradients reduced
    in float32 or, through DDP's bf16_compress_hook, bfloat16) rather than per layer."""
    return (
        zero_stage == 0
        and config.tp == 1
        and config.pp == 1
        and config.param_dtype == "float32"
        and config.grad_reduce_dtype in ("float32", "bfloat16")
    )


def params_are_dtensors(config: ParallelConfig, zero_stage: int) -> bool:
    """Whether the backend makes the parameters DTensors (tensor parallelism, or FSDP2 for the
    data-parallel sync: every case but DDP's reducer and a single data-parallel rank)."""
    return config.tp > 1 or (config.dp > 1 and not uses_ddp_buckets(config, zero_stage))


def dtensor_step_s_per_tensor(cluster: ClusterSpec, config: ParallelConfig, zero_stage: int) -> float:
    """Optimizer host seconds per parameter tensor: `device.dtensor_param_step_us` when the
    parameters are DTensors, else 0."""
    return cluster.device.dtensor_param_step_us * 1e-6 if params_are_dtensors(config, zero_stage) else 0.0


def dp_sync_coefficients(cluster: ClusterSpec, config: ParallelConfig, zero_stage: int) -> tuple[float, float]:
    """(seconds per local parameter, latency seconds per layer holding parameters) of the
    end-of-step gradient sync. DDP's reducer all-reduces DDP_BUCKET_BYTES buckets instead
    of layers: its latency is charged per byte, one latency per bucket."""
    if config.dp == 1 or zero_stage == 3:
        return 0.0, 0.0
    grad_bytes = DTYPE_BYTES[config.grad_reduce_dtype]
    if zero_stage == 0:  # DDP / Megatron: one hierarchical NCCL all-reduce
        per_byte, latency = collective_coefficients("all_reduce", group_levels(cluster, config.dp, config.tp))
        if uses_ddp_buckets(config, zero_stage):
            return (per_byte + latency / DDP_BUCKET_BYTES) * grad_bytes, 0.0
        return per_byte * grad_bytes, latency
    levels = flat_levels(cluster, config.dp, config.tp)  # sharded data parallel (communication.flat_levels)
    rs_byte, rs_latency = collective_coefficients("reduce_scatter", levels)
    ag_byte, ag_latency = collective_coefficients("all_gather", levels)
    return rs_byte * grad_bytes + ag_byte * DTYPE_BYTES[config.param_dtype], rs_latency + ag_latency


def p2p_time_s(profile: ModelProfile, cluster: ClusterSpec, config: ParallelConfig) -> float:
    """One boundary send (the largest layer output) for one micro-batch; 0 when pp = 1."""
    if config.pp == 1:
        return 0.0
    boundary = max(layer.output_bytes for layer in profile.layers[:-1]) if len(profile.layers) > 1 else 0.0
    num_bytes = boundary * config.micro_batch_size * DTYPE_BYTES[config.param_dtype] / 4
    if config.sequence_parallel:
        num_bytes /= config.tp  # Megatron scatters the boundary activation over tp
    return estimate_p2p_s(num_bytes, pipeline_link(cluster, config.pp, config.dp * config.tp))


def step_collectives_s(profile: ModelProfile, cluster: ClusterSpec, config: ParallelConfig) -> float:
    """Collectives issued once per step whatever the layer placement: the loss all-reduced
    over dp and broadcast from the last pipeline stage (4 bytes each: their latency and call
    overhead); DDP's small first bucket (1 MiB, one call more than bytes / 25 MiB); and the
    gradients of parameters tied across pipeline stages (an embedding shared with the output
    head) all-reduced between the stages holding them."""
    scalar = 4.0
    total = 0.0
    if config.dp > 1:
        dp_levels = group_levels(cluster, config.dp, config.tp)
        total += estimate_all_reduce_s(scalar, dp_levels)
        if uses_ddp_buckets(config, config.zero_stage):
            total += collective_coefficients("all_reduce", dp_levels)[1]
    if config.pp > 1:
        pp_levels = group_levels(cluster, config.pp, config.dp * config.tp)
        total += estimate_collective_s("all_gather", scalar, pp_levels)  # a broadcast: one ring pass
        link = pipeline_link(cluster, config.pp, config.dp * config.tp)
        for names in profile.tied_parameters:
            owner = max(
                (layer for layer in profile.layers if names[0].startswith(layer.name + ".")),
                key=lambda layer: len(layer.name),
                default=None,
            )
            if owner is not None:
                grad_bytes = local_param_count(owner, config.tp) * DTYPE_BYTES[config.grad_reduce_dtype]
                total += estimate_all_reduce_s(grad_bytes, [(2, link)])
    return total


def bubble_speedup(device: DeviceSpec) -> float:
    """r: how much faster than all-busy a rank runs while its pipeline peers wait: it gets a core
    of its own (`ranks_per_core`), but no more than `shared_core_slowdown` (1 on GPUs).

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> bubble_speedup(ClusterSpec.preset("dgx-h100").device)
    1.0
    """
    return min(device.shared_core_slowdown, device.ranks_per_core)


def pipeline_sends(config: ParallelConfig, shared_cores: bool) -> tuple[int, int]:
    """(sends on the critical path's ramp, sends added outright) of one step (module docstring).

    >>> config = ParallelConfig(mesh={"dp": 1, "pp": 4, "tp": 1}, micro_batch_size=1, num_micro_batches=8)
    >>> pipeline_sends(config, shared_cores=False), pipeline_sends(config, shared_cores=True)
    ((0, 22), (6, 0))
    """
    m, v, p = config.num_micro_batches, config.virtual_stages, config.pp
    if p == 1:
        return 0, 0
    return (2 * (p * v - 1), 0) if shared_cores else (0, 2 * (m * v + p - 1))


def pipeline_time_s(
    stage_times_s: list[float],
    config: ParallelConfig,
    p2p_s: float,
    bubble_speedup: float = 1.0,
    shared_cores: bool = False,
) -> float:
    """max((m max + (sum - max) / v) / r + ramp p2p, m sum / p) + outright p2p (module docstring;
    r = `bubble_speedup`, the send counts `pipeline_sends`)."""
    m, v, p = config.num_micro_batches, config.virtual_stages, config.pp
    slowest, total = max(stage_times_s), sum(stage_times_s)
    ramp, outright = pipeline_sends(config, shared_cores)
    critical_s = (m * slowest + (total - slowest) / v) / bubble_speedup + ramp * p2p_s
    return max(critical_s, m * total / p) + outright * p2p_s


def fixed_memory_bytes(
    profile: ModelProfile,
    cluster: ClusterSpec,
    config: ParallelConfig,
    rank_layers: list[LayerProfile],
    zero_stage: int,
) -> dict[str, float]:
    """Memory terms of a rank that do not scale with its layer count."""
    mbs, tp = config.micro_batch_size, config.tp
    terms = {
        "transient_bytes": estimate_transient_bytes(
            rank_layers,
            micro_batch_size=mbs,
            tp=tp,
            activation_dtype=config.param_dtype,
            sequence_parallel=config.sequence_parallel,
        ),
        "comm_buffer_bytes": estimate_comm_buffer_bytes(
            profile.layers,
            micro_batch_size=mbs,
            tp=tp,
            ddp_bucket_views=uses_ddp_buckets(config, zero_stage),
            dp=config.dp,
            activation_dtype=config.param_dtype,
            grad_reduce_dtype=config.grad_reduce_dtype,
        ),
        "framework_overhead_bytes": float(cluster.device.framework_overhead_bytes),
        "zero3_gathered_bytes": 0.0,
    }
    if zero_stage == 3:
        terms["zero3_gathered_bytes"] = estimate_zero3_gathered_bytes(
            profile.layers, tp=tp, param_dtype=config.param_dtype
        )
    return terms


@dataclass
class StepEstimate:
    """The cost model's prediction for one fully specified plan."""

    step_time_s: float
    peak_memory_bytes: float
    breakdown: dict[str, float]
    rank_time_s: list[float]
    """Per pipeline rank: one micro-batch through all its stages (incl. exposed ZeRO-3 comm)."""
    rank_memory_bytes: list[float]
    rank_memory: list[dict[str, float]] = field(default_factory=list)


def _rank_estimate(
    profile: ModelProfile,
    cluster: ClusterSpec,
    config: ParallelConfig,
    rank: int,
    entries: list[tuple[int, str]],
    penalty: float,
) -> tuple[float, tuple[float, float], dict[str, float], dict[str, float]]:
    """One pipeline rank of `estimate_step`: its time for one micro-batch (incl. exposed ZeRO-3
    comm), its (exposed DP sync, optimizer step) seconds, its tp/recompute/ZeRO-3 terms and its
    memory terms."""
    costs = [
        config_layer_cost(profile.layers[index], option, cluster, config, seq_len=profile.seq_len)
        for index, option in entries
    ]
    busy_s = sum(cost.time_s for cost in costs)
    zero3_s = sum(c.zero3_exposed_s for c in costs) if config.zero_stage == 3 else 0.0
    local_params = sum(cost.local_params for cost in costs)
    per_param_s, latency_s = dp_sync_coefficients(cluster, config, config.zero_stage)
    sync_s = per_param_s * local_params + latency_s * sum(c.sync_units for c in costs) if per_param_s else 0.0
    shard = local_params / (config.dp if config.zero_stage >= 1 else 1)
    optimizer_s = estimate_optimizer_step_s(shard, cluster.device, config.param_dtype) + dtensor_step_s_per_tensor(
        cluster, config, config.zero_stage
    ) * sum(c.param_tensors for c in costs)
    extra = (exposed_s(sync_s, sum(c.backward_s for c in costs), penalty), optimizer_s)
    terms = {
        "tp_comm_s": sum(c.tp_comm_s for c in costs),
        "recompute_s": sum(c.recompute_s for c in costs),
        "zero3_exposed_s": zero3_s,
    }
    memory = estimate_model_state_bytes(
        local_params, zero_stage=config.zero_stage, dp=config.dp, param_dtype=config.param_dtype
    )
    in_flight = in_flight_micro_batches(
        config.schedule, rank, config.pp, config.num_micro_batches, config.virtual_stages
    )
    memory["activations_bytes"] = in_flight * sum(cost.activation_bytes for cost in costs)
    memory["dequantized_bytes"] = max((cost.dequantized_bytes for cost in costs), default=0.0)
    memory.update(
        fixed_memory_bytes(profile, cluster, config, [profile.layers[i] for i, _ in entries], config.zero_stage)
    )
    memory["allocator_reserve_bytes"] = allocator_reserve_bytes(memory, cluster.device.allocator_reserve_fraction)
    return busy_s + zero3_s, extra, terms, memory


def estimate_step(
    profile: ModelProfile, cluster: ClusterSpec, config: ParallelConfig, rank_layers: list[list[tuple[int, str]]]
) -> StepEstimate:
    """Predict step time and per-rank memory of a plan.

    `rank_layers[i]` lists (layer index, recompute option) of pipeline rank i.
    """
    times, extras, memories = [], [], []
    penalty = overlap_penalty(cluster)
    worst = {"tp_comm_s": 0.0, "recompute_s": 0.0, "zero3_exposed_s": 0.0}
    for rank, entries in enumerate(rank_layers):
        time_s, extra, terms, memory = _rank_estimate(profile, cluster, config, rank, entries, penalty)
        times.append(time_s)
        extras.append(extra)
        if times[-1] >= max(times):
            worst = terms
        memories.append(memory)
    p2p_s = p2p_time_s(profile, cluster, config)
    shared = cluster.device.shared_core_slowdown > 1
    pipeline_s = pipeline_time_s(times, config, p2p_s, bubble_speedup(cluster.device), shared)
    sync_rank = max(range(len(extras)), key=lambda i: sum(extras[i]))
    m = config.num_micro_batches
    rank_memory_bytes = [sum(memory.values()) for memory in memories]
    peak_rank = max(range(len(memories)), key=lambda i: rank_memory_bytes[i])
    p2p_total_s = p2p_s * sum(pipeline_sends(config, shared))
    breakdown = {
        "pipeline_s": pipeline_s,
        "stage_max_s": max(times),
        "bubble_s": max(0.0, pipeline_s - m * max(times) - p2p_total_s),
        "p2p_s": p2p_total_s,
        "tp_comm_s": m * worst["tp_comm_s"],
        "recompute_s": m * worst["recompute_s"],
        "zero3_exposed_s": m * worst["zero3_exposed_s"],
        "dp_sync_exposed_s": extras[sync_rank][0],
        "optimizer_s": extras[sync_rank][1],
        **memories[peak_rank],
    }
    step_collectives = step_collectives_s(profile, cluster, config)
    breakdown["step_collectives_s"] = step_collectives
    return StepEstimate(
        step_time_s=pipeline_s + sum(extras[sync_rank]) + step_collectives,
        peak_memory_bytes=max(rank_memory_bytes),
        breakdown=breakdown,
        rank_time_s=times,
        rank_memory_bytes=rank_memory_bytes,
        rank_memory=memories,
    )
