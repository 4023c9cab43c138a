"""Alpha-beta cost of the collectives a plan issues, with hierarchical groups.

A mesh axis is laid out (pp, dp, tp) with tp innermost: the tp group of a rank is
`tp` consecutive devices (stride 1), dp has stride `tp`, pp stride `dp * tp`. A group
of `size` members at `stride` stays inside one node when size * stride <=
devices_per_node; otherwise it is split into an intra-node level
(min(size, devices_per_node // stride) members over NVLink) and an inter-node level
(the rest, over InfiniBand at the per-device NIC rate).

Ring collectives on a level with n members, B bytes, bandwidth bw, latency alpha
(Thakur, Rabenseifner & Gropp 2005; NCCL's ring algorithm), plus the link's fixed
`collective_overhead_us` o per call (0 on GPUs; on CPU ranks sharing cores the wait for
peers to be scheduled, calibrated):
    reduce-scatter / all-gather: (n-1)/n * B / bw + (n-1) * alpha + o
    all-reduce (= reduce-scatter + all-gather):  2 (n-1)/n * B / bw + 2 (n-1) * alpha + o
Across nodes NCCL's all-reduce runs on double binary trees (`LinkSpec.tree_all_reduce`, the
GPU presets' inter-node links): the same bandwidth term, latency 2 ceil(log2 n) * alpha, so
data parallelism over hundreds of nodes pays microseconds per call, not milliseconds.
Hierarchical (intra first): reduce-scatter inside the node, then the collective
across nodes on the B / n_intra shard each device holds, then all-gather inside.

Every estimate is affine in the bytes: `collective_coefficients` returns the
(seconds per byte, latency seconds) pair so the MILP can use the same numbers.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> c = ClusterSpec.preset("dgx-a100-80gb", num_nodes=2)
    >>> round(estimate_all_reduce_s(1e9, group_levels(c, size=8, stride=1)), 4)
    0.0065
"""

from __future__ import annotations

import math
from typing import Literal

from autoplan.schema.cluster import ClusterSpec, LinkSpec

Collective = Literal["all_reduce", "all_gather", "reduce_scatter"]

# Share of the link rate NCCL's ring reaches on large messages ("bus bandwidth" in
# nccl-tests is ~90% of NVLink and ~90% of the HCA line rate on DGX A100; NVIDIA's
# DGX A100 reference architecture reports ~230 GB/s busbw for all-reduce over NVLink 3).
LINK_EFFICIENCY = 0.9

# Share of the link rate a flat ring of sharded-data-parallel collectives reaches
# (calibrated on Table 2 of Narayanan et al. SC21, see `flat_levels`).
SHARDED_RING_EFFICIENCY = 0.7

Level = tuple[int, LinkSpec]

# Share of overlapped communication time still charged to the step: NCCL kernels
# occupy SMs and HBM bandwidth while compute runs (Jangda et al., CoCoNet, ASPLOS 2022,
# report 10-35% compute slow-down under concurrent collectives). Calibrated against
# Table 2 of Narayanan et al. SC21 (benchmarks/megatron_sc21.py).
OVERLAP_PENALTY = 0.3


def overlap_penalty(cluster: ClusterSpec) -> float:
    """OVERLAP_PENALTY where collectives run beside compute, else 1 (all exposed)."""
    return OVERLAP_PENALTY if cluster.device.overlaps_communication else 1.0


def exposed_s(communication_s: float, overlappable_s: float, penalty: float = OVERLAP_PENALTY) -> float:
    """(1 - penalty) * max(0, c - w) + penalty * c  (penalty: `overlap_penalty`)."""
    return (1 - penalty) * max(0.0, communication_s - overlappable_s) + penalty * communication_s


def group_levels(cluster: ClusterSpec, size: int, stride: int) -> list[Level]:
    """The (members, link) levels of a group, innermost first; empty for size 1.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> c = ClusterSpec.preset("dgx-a100-80gb", num_nodes=4)
    >>> [(n, link.bandwidth_gbps) for n, link in group_levels(c, size=8, stride=4)]
    [(2, 300.0), (4, 25.0)]
    """
    if size <= 1:
        return []
    per_node = cluster.devices_per_node
    if size * stride <= per_node:
        return [(size, cluster.intra_node)]
    intra = max(1, min(size, per_node // stride))
    while size % intra:  # a group splits evenly over the nodes it spans
        intra -= 1
    levels: list[Level] = []
    if intra > 1:
        levels.append((intra, cluster.intra_node))
    levels.append((size // intra, cluster.inter_node))
    return levels


def flat_levels(cluster: ClusterSpec, size: int, stride: int) -> list[Level]:
    """One ring over the whole group at the slowest link's rate, for sharded-data-parallel
    (ZeRO / FSDP) collectives: they are issued per parameter bucket over the global dp
    group and, as Table 2 of Narayanan et al. (SC21) shows, do not get the intra-node
    aggregation of hierarchical NCCL all-reduce — DeepSpeed ZeRO-3's step time at one
    micro-batch stays ~67 s from 768 to 1536 GPUs, i.e. every GPU moves the whole
    parameter volume through its own NIC, at ~70% of its line rate (3 collectives of
    350 GB in ~60 s = 17.5 GB/s of 25): SHARDED_RING_EFFICIENCY (benchmarks/megatron_sc21.py).

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> c = ClusterSpec.preset("dgx-a100-80gb", num_nodes=4)
    >>> [(n, round(link.bandwidth_gbps, 1)) for n, link in flat_levels(c, size=32, stride=1)]
    [(32, 19.4)]
    """
    if size <= 1:
        return []
    link = cluster.intra_node if size * stride <= cluster.devices_per_node else cluster.inter_node
    return [
        (
            size,
            LinkSpec(
                bandwidth_gbps=link.bandwidth_gbps * SHARDED_RING_EFFICIENCY / LINK_EFFICIENCY,
                latency_us=link.latency_us,
                collective_overhead_us=link.collective_overhead_us,
            ),
        )
    ]


def collective_coefficients(kind: Collective, levels: list[Level]) -> tuple[float, float]:
    """(seconds per byte, latency seconds) of a ring `kind` over hierarchical `levels` (a tree's
    latency for an all-reduce over a `tree_all_reduce` link).

    `bytes` is the full (unsharded) buffer: the all-reduced tensor, the gathered
    output of all-gather or the input of reduce-scatter.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> c = ClusterSpec.preset("dgx-h100", num_nodes=512)
    >>> levels = group_levels(c, size=512, stride=8)      # one GPU per node, 512 nodes
    >>> [round(collective_coefficients(kind, levels)[1] * 1e6) for kind in ("all_reduce", "all_gather")]
    [90, 2555]
    """
    per_byte, latency, shard = 0.0, 0.0, 1.0
    passes = 2 if kind == "all_reduce" else 1
    for members, link in levels:
        bandwidth = link.bandwidth_gbps * 1e9 * LINK_EFFICIENCY
        # all-reduce: every level reduce-scatters going out and all-gathers coming back
        per_byte += passes * (members - 1) / members / shard / bandwidth
        hops = math.ceil(math.log2(members)) if kind == "all_reduce" and link.tree_all_reduce else members - 1
        latency += passes * hops * link.latency_us * 1e-6 + link.collective_overhead_us * 1e-6
        shard *= members
    return per_byte, latency


def estimate_collective_s(kind: Collective, num_bytes: float, levels: list[Level]) -> float:
    """Seconds for one ring collective of `num_bytes` over `levels` (0 for a group of 1)."""
    per_byte, latency = collective_coefficients(kind, levels)
    return per_byte * num_bytes + latency


def estimate_all_reduce_s(num_bytes: float, levels: list[Level]) -> float:
    """2(n-1)/n * B / bw + 2(n-1) * alpha per level (see module docstring)."""
    return estimate_collective_s("all_reduce", num_bytes, levels)


def estimate_all_gather_s(num_bytes: float, levels: list[Level]) -> float:
    """(n-1)/n * B / bw + (n-1) * alpha per level; B is the gathered size."""
    return estimate_collective_s("all_gather", num_bytes, levels)


def estimate_reduce_scatter_s(num_bytes: float, levels: list[Level]) -> float:
    """(n-1)/n * B / bw + (n-1) * alpha per level; B is the input size."""
    return estimate_collective_s("reduce_scatter", num_bytes, levels)


def estimate_p2p_s(num_bytes: float, link: LinkSpec) -> float:
    """One point-to-point send: B / bw + alpha + `p2p_overhead_us`. Not `collective_overhead_us`:
    pipeline schedules post their receives ahead (batched isend/irecv), so a send waits
    only for its receiver to be scheduled (measured on CPU ranks, 0 on GPUs), not for a
    whole group.

    >>> round(estimate_p2p_s(25e6, LinkSpec(bandwidth_gbps=25.0, latency_us=5.0)) * 1e3, 3)
    1.116
    """
    return num_bytes / (link.bandwidth_gbps * 1e9 * LINK_EFFICIENCY) + (link.latency_us + link.p2p_overhead_us) * 1e-6


def pipeline_link(cluster: ClusterSpec, pp: int, stride: int) -> LinkSpec:
    """The link between neighbouring pipeline ranks: NVLink when the whole pipeline
    fits in a node, else InfiniBand (the slowest boundary sets the pace)."""
    return cluster.intra_node if pp * stride <= cluster.devices_per_node else cluster.inter_node
