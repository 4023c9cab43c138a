"""Cost of one layer for one micro-batch on one device under a parallel configuration and a
layer option (recompute, activation storage): compute (`costmodels.compute`), its tensor-
parallel collectives and ZeRO-3 traffic, the activations it keeps and the parameters it
holds. `costmodels.pipeline` sums these per pipeline rank; the MILP of
`autoplan.planner.solver` takes them as coefficients.

Tensor-parallel collectives: an all-reduce after each rowwise Linear / vocab-split embedding
or output in forward, one per group of colwise Linears reading one tensor in backward
(`tp_collectives`); sequence parallelism splits each into a reduce-scatter and an
all-gather, the same bytes in twice the calls (`tp_site_comm_s`). Each site also pays
DTensor's host time per micro-batch (`tp_dispatch_s`).

A layer storing its activations narrower than it computes (`layer_option` "none@float8_e4m3fn")
keeps that share of the bytes and pays the casts (`compute.estimate_storage_cast_s`); while its
backward runs, one node's dequantized copies are live beside the stored ones (`dequantized_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.costmodels.communication import (
    estimate_all_reduce_s,
    estimate_collective_s,
    exposed_s,
    flat_levels,
    group_levels,
    overlap_penalty,
)
from autoplan.costmodels.compute import (
    DTYPE_BYTES,
    estimate_layer_time,
    estimate_storage_cast_s,
    linear_flops_fraction,
)
from autoplan.costmodels.memory import estimate_activation_bytes, local_param_count
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import FLOAT8, split_layer_option
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.plan import INPUT_STYLES
from autoplan.schema.profile import LayerProfile


@dataclass(frozen=True)
class LayerCost:
    """One layer with one recompute option, for one micro-batch on one device."""

    compute_s: float
    """Forward + backward matmul and elementwise time."""
    recompute_s: float
    tp_comm_s: float
    backward_s: float
    """The part of the layer's time a data-parallel sync can overlap (backward + recompute)."""
    activation_bytes: float
    local_params: float
    zero3_comm_s: float
    """ZeRO-3 per micro-batch: all-gather forward + all-gather backward + reduce-scatter."""
    zero3_exposed_s: float = 0.0
    """The part of `zero3_comm_s` the layer's own compute does not hide (`fsdp_exposed_s`)."""
    sync_units: float = 0.0
    """1 when the layer holds parameters: the backend syncs its gradients in a collective of its own."""
    param_tensors: float = 0.0
    """Parameter tensors the layer holds (the optimizer's per-tensor host time with DTensors)."""
    dequantized_bytes: float = 0.0
    """With activations stored narrower: what its backward adds, the saved tensors of one
    backward node dequantized back to the compute dtype beside their stored copies (each node
    unpacks its own, freed when it ends: `LayerProfile.largest_node_saved_bytes`, the whole
    layer's for profiles without it). The peak measured in tests/unit/test_activation_storage.py
    falls by the stored saving less this."""

    @property
    def time_s(self) -> float:
        return self.compute_s + self.recompute_s + self.tp_comm_s


def config_layer_cost(
    layer: LayerProfile,
    recompute: str,
    cluster: ClusterSpec,
    config: ParallelConfig,
    sequence_parallel: bool | None = None,
    *,
    seq_len: int,
) -> LayerCost:
    """`estimate_layer_cost` under `config` (its sequence parallelism unless `sequence_parallel`
    is given) for sequences of `seq_len` tokens (the profile's)."""
    return estimate_layer_cost(
        layer,
        recompute,
        cluster,
        dp=config.dp,
        tp=config.tp,
        micro_batch_size=config.micro_batch_size,
        sequence_parallel=config.sequence_parallel if sequence_parallel is None else sequence_parallel,
        param_dtype=config.param_dtype,
        grad_reduce_dtype=config.grad_reduce_dtype,
        seq_len=seq_len,
    )


def estimate_layer_cost(
    layer: LayerProfile,
    recompute: str,
    cluster: ClusterSpec,
    *,
    dp: int,
    tp: int,
    micro_batch_size: int,
    sequence_parallel: bool,
    param_dtype: str,
    grad_reduce_dtype: str,
    seq_len: int = 0,
) -> LayerCost:
    """Per-micro-batch cost terms of `layer` (see module docstring) under `recompute`, a
    `layer_option`: with activations stored narrower than `param_dtype`, they take that
    share of the bytes and pay the casts (`estimate_storage_cast_s`); with float8 matmuls its
    Linears' share of the FLOPs (`linear_flops_fraction`, sequences of `seq_len` tokens) runs
    at the float8 rate."""
    recompute, storage, matmul = split_layer_option(recompute)
    times = estimate_layer_time(
        layer,
        cluster.device,
        micro_batch_size=micro_batch_size,
        tp=tp,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        compute_dtype=param_dtype,
        float8_flops_fraction=linear_flops_fraction(layer, seq_len) if matmul == FLOAT8 else 0.0,
    )
    act_scale = micro_batch_size * DTYPE_BYTES[param_dtype] / 4
    tp_levels = group_levels(cluster, tp, 1)
    fwd_calls, bwd_calls = tp_collectives(layer)
    fwd_comm = (
        fwd_calls * tp_site_comm_s(layer.tp_allreduce_bytes_fwd * act_scale / fwd_calls, tp_levels, sequence_parallel)
        if tp > 1 and layer.tp_allreduce_bytes_fwd
        else 0.0
    )
    bwd_comm = (
        bwd_calls * tp_site_comm_s(layer.tp_allreduce_bytes_bwd * act_scale / bwd_calls, tp_levels, sequence_parallel)
        if tp > 1 and layer.tp_allreduce_bytes_bwd
        else 0.0
    )
    dispatch = tp_dispatch_s(layer, cluster, sequence_parallel) if tp > 1 else 0.0
    fwd_comm += dispatch / 2
    bwd_comm += dispatch / 2
    recompute_comm = fwd_comm if recompute == "full" else 0.0
    activation_bytes = estimate_activation_bytes(
        layer,
        recompute,
        micro_batch_size=micro_batch_size,
        tp=tp,
        sequence_parallel=sequence_parallel,
        activation_dtype=param_dtype,
    )
    cast_fwd = cast_bwd = dequantized = 0.0
    if storage is not None:
        cast_fwd, cast_bwd = estimate_storage_cast_s(activation_bytes, cluster.device, storage, param_dtype)
        largest, none_bytes = layer.largest_node_saved_bytes, layer.saved_bytes.get("none", 0.0)
        dequantized = activation_bytes * (min(1.0, largest / none_bytes) if largest and none_bytes else 1.0)
        activation_bytes *= DTYPE_BYTES[storage] / DTYPE_BYTES[param_dtype]
    params = local_param_count(layer, tp)
    backward_s = times.backward_s + times.recompute_s + bwd_comm + recompute_comm + cast_bwd
    zero3_comm, zero3_exposed = zero3_terms(
        params, cluster, dp, tp, param_dtype, grad_reduce_dtype, times.forward_s + cast_fwd + fwd_comm, backward_s
    )
    return LayerCost(
        compute_s=times.forward_s + times.backward_s + cast_fwd + cast_bwd,
        recompute_s=times.recompute_s,
        tp_comm_s=fwd_comm + bwd_comm + recompute_comm,
        backward_s=backward_s,
        activation_bytes=activation_bytes,
        local_params=params,
        zero3_comm_s=zero3_comm,
        zero3_exposed_s=zero3_exposed,
        sync_units=1.0 if params else 0.0,
        param_tensors=float(layer.param_tensors),
        dequantized_bytes=dequantized,
    )


def zero3_terms(
    params: float,
    cluster: ClusterSpec,
    dp: int,
    tp: int,
    param_dtype: str,
    grad_reduce_dtype: str,
    forward_s: float,
    backward_s: float,
) -> tuple[float, float]:
    """(traffic, exposed) seconds of a layer's ZeRO-3 collectives per micro-batch: all-gather of
    its `params` in forward and again in backward, reduce-scatter of their gradients, over one
    flat ring of the dp group (`communication.flat_levels`); exposed as `fsdp_exposed_s` says."""
    if dp == 1:
        return 0.0, 0.0
    dp_levels = flat_levels(cluster, dp, tp)
    gather_s = estimate_collective_s("all_gather", params * DTYPE_BYTES[param_dtype], dp_levels)
    scatter_s = estimate_collective_s("reduce_scatter", params * DTYPE_BYTES[grad_reduce_dtype], dp_levels)
    exposed = fsdp_exposed_s(gather_s, scatter_s, forward_s, backward_s, overlap_penalty(cluster))
    return 2 * gather_s + scatter_s, exposed


def fsdp_exposed_s(gather_s: float, scatter_s: float, forward_s: float, backward_s: float, penalty: float) -> float:
    """ZeRO-3 traffic of one layer left on the critical path, as FSDP2 schedules it: the layer's
    all-gather is prefetched while its neighbour's forward runs, and in backward its re-gather
    (parameters resharded after forward) and its gradients' reduce-scatter run on their own
    streams beside its backward (recompute included). Each phase exposes
    `exposed_s(comm, compute, penalty)`: what outlasts the compute, plus the `penalty` share
    of what overlaps (the collectives' SMs and HBM traffic slow the compute they hide behind).

    >>> round(fsdp_exposed_s(1.0, 2.0, forward_s=2.0, backward_s=4.0, penalty=0.0), 3)   # all hidden
    0.0
    >>> round(fsdp_exposed_s(1.0, 2.0, forward_s=0.5, backward_s=4.0, penalty=0.0), 3)   # forward outlasted
    0.5
    """
    return exposed_s(gather_s, forward_s, penalty) + exposed_s(gather_s + scatter_s, backward_s, penalty)


def tp_dispatch_s(layer: LayerProfile, cluster: ClusterSpec, sequence_parallel: bool) -> float:
    """DTensor's host time for `layer`'s tensor-parallel sites, forward + backward of one
    micro-batch (`device.tp_dispatch_overhead_us` per site; half forward, half backward).
    Norm / dropout sites are DTensors only with sequence parallelism."""
    sites = sum(
        site.style not in INPUT_STYLES and (site.style != "sequence_parallel" or sequence_parallel)
        for site in layer.tp_sites.values()
    )
    return sites * cluster.device.tp_dispatch_overhead_us * 1e-6


def tp_site_comm_s(num_bytes: float, levels: list, sequence_parallel: bool) -> float:
    """One tensor-parallel site's collective on `num_bytes`: an all-reduce, or with sequence
    parallelism the reduce-scatter and all-gather it splits into (same bytes moved, but two
    calls, each paying `collective_overhead_us`).

    >>> from autoplan.schema.cluster import LinkSpec
    >>> levels = [(2, LinkSpec(bandwidth_gbps=1.0, latency_us=0.0, collective_overhead_us=1000.0))]
    >>> round((tp_site_comm_s(0, levels, True) - tp_site_comm_s(0, levels, False)) * 1e3, 3)
    1.0
    """
    if not sequence_parallel:
        return estimate_all_reduce_s(num_bytes, levels)
    return estimate_collective_s("reduce_scatter", num_bytes, levels) + estimate_collective_s(
        "all_gather", num_bytes, levels
    )


def tp_collectives(layer: LayerProfile) -> tuple[int, int]:
    """(forward, backward) tensor-parallel all-reduces of `layer` per micro-batch (at least 1 each):
    one per rowwise / vocab-split site forward; backward one per group of colwise Linears
    (sites under one parent module read one tensor) and per vocab-split output head.

    >>> from autoplan.schema.plan import TPSite
    >>> sites = {f"b.attn.{n}": TPSite(style="colwise") for n in "qkv"}
    >>> sites.update({"b.attn.o": TPSite(style="rowwise"), "b.mlp.fc": TPSite(style="colwise"),
    ...               "b.mlp.proj": TPSite(style="rowwise")})
    >>> tp_collectives(LayerProfile(name="b", signature="s", param_count=1, fwd_flops=0, bwd_flops=0,
    ...                             saved_bytes={}, output_bytes=0, tp_sites=sites))
    (2, 2)
    """
    sites = layer.tp_sites.items()
    forward = sum(site.style in ("rowwise", "vocab_embedding", "vocab_output") for _, site in sites)
    colwise_parents = {path.rpartition(".")[0] for path, site in sites if site.style == "colwise"}
    backward = len(colwise_parents) + sum(site.style == "vocab_output" for _, site in sites)
    return max(forward, 1), max(backward, 1)
