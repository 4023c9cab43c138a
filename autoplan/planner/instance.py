"""One (mesh, micro-batch size) candidate of the outer loop: the Instance the MILP of
`autoplan.planner.solver` is built from, the configuration combinations it offers, and the
lower bound on its step time by which the outer loop visits and prunes candidates.

The bound is what no placement can beat: perfect balance (but the slowest rank holds at
least ceil(N/p) blocks), the smallest bubble the schedules allow, the cheapest recompute
and SP option per layer, and per ZeRO option only the unavoidable `overlap_penalty` share
of its communication. Candidates whose model states cannot fit even fully sharded get an
infinite bound.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from autoplan.costmodels.compute import estimate_optimizer_step_s
from autoplan.costmodels.layer import LayerCost, config_layer_cost
from autoplan.costmodels.memory import model_state_bytes_per_param
from autoplan.costmodels.pipeline import (
    bubble_speedup,
    dp_sync_coefficients,
    dtensor_step_s_per_tensor,
    overlap_penalty,
    p2p_time_s,
    pipeline_sends,
    step_collectives_s,
)
from autoplan.costmodels.uncertainty import usable_memory_bytes
from autoplan.errors import AutoplanError
from autoplan.planner.precision import PrecisionChoices
from autoplan.planner.search_space import LayerSplit, can_sequence_parallel, schedule_options
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import FLOAT8, RECOMPUTE_OPTIONS, Constraints, layer_option, split_layer_option
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.profile import ModelProfile

ZERO_OPTIONS = (0, 1, 3)  # ZeRO-2 costs what ZeRO-1 does (memory.py); planned only when pinned


@dataclass
class Instance:
    """Everything the MILP of one (mesh, micro-batch size) needs."""

    profile: ModelProfile
    cluster: ClusterSpec
    split: LayerSplit
    base: ParallelConfig
    options: list[str]
    schedules: list[tuple[str, int]]
    zeros: list[int]
    sps: list[bool]
    costs: dict[tuple[int, str, bool], LayerCost]
    cap_bytes: float
    block_option: str | None = None
    """Pinned option of the repeated blocks (a recompute pin, or a pinned activation storage)."""
    storage_dtypes: tuple[str, ...] = ()
    """Narrower dtypes the blocks may store activations in, as alternatives to recompute "none"."""
    matmul_dtype: str | None = None
    """The blocks' Linears multiply in this dtype (float8_e4m3fn) rather than param_dtype."""
    zero_bounds_s: dict[int, float] = field(default_factory=dict)
    """Lower bound on the step time per ZeRO stage (filled by `lower_bound_s`)."""

    @property
    def pp(self) -> int:
        return self.base.pp

    def rank_fixed_layers(self, rank: int) -> list[int]:
        fixed = list(self.split.prefix) if rank == 0 else []
        return fixed + (list(self.split.suffix) if rank == self.pp - 1 else [])

    def block_options(self) -> list[str]:
        """The options of a repeated block: the recompute options and, beside "none", storing
        its activations in each of `storage_dtypes`."""
        options = [self.block_option] if self.block_option else list(self.options)
        if "none" in options:  # a recompute pin "none" leaves the storage choice free
            options += [layer_option("none", dtype) for dtype in self.storage_dtypes]
        if self.matmul_dtype is None:
            return options
        return [layer_option(*split_layer_option(option)[:2], self.matmul_dtype) for option in options]

    def config(self, schedule: tuple[str, int], zero: int, sp: bool) -> ParallelConfig:
        return self.base.replace(
            schedule=schedule[0], virtual_stages=schedule[1], zero_stage=zero, sequence_parallel=sp
        )


def build_instance(
    profile: ModelProfile,
    cluster: ClusterSpec,
    split: LayerSplit,
    mesh: tuple[int, int, int],
    micro_batch_size: int,
    constraints: Constraints,
    precision: PrecisionChoices,
) -> Instance | None:
    dp, pp, tp = mesh
    m = profile.global_batch_size // (dp * micro_batch_size)
    schedules = schedule_options(pp, m, len(split.blocks), constraints)
    if not schedules:
        return None
    if constraints.zero_stage and dp == 1:
        return None  # ZeRO shards over dp: with one dp rank it would change nothing but its name
    zeros = [constraints.zero_stage] if constraints.zero_stage is not None else (list(ZERO_OPTIONS) if dp > 1 else [0])
    sps = [False, True] if tp > 1 and can_sequence_parallel(profile) else [False]
    if constraints.sequence_parallel is not None:
        sps = [constraints.sequence_parallel and tp > 1]
    options = [o for o in RECOMPUTE_OPTIONS if all(o in layer.saved_bytes for layer in profile.layers)]
    if constraints.recompute and constraints.recompute not in options:
        raise AutoplanError(f"recompute={constraints.recompute!r} is not available; the profile offers {options}")
    base = ParallelConfig(
        mesh={"dp": dp, "pp": pp, "tp": tp},
        micro_batch_size=micro_batch_size,
        num_micro_batches=m,
        param_dtype=precision.param_dtype,
        grad_reduce_dtype=precision.grad_reduce_dtype,
    )
    block_option: str | None = constraints.recompute
    if precision.storage_pinned:
        block_option = layer_option("none", precision.storage_dtypes[0])
    inst = Instance(
        profile,
        cluster,
        split,
        base,
        options,
        schedules,
        zeros,
        sps,
        {},
        # the plan's memory upper bound must fit, not its point estimate
        usable_memory_bytes(constraints.max_memory_fraction * cluster.device.memory_bytes, cluster.device.kind),
        block_option,
        precision.storage_dtypes,
    )
    if precision.matmul_dtypes and (precision.matmul_pinned or _float8_is_faster(profile, cluster, split, base)):
        inst.matmul_dtype = precision.matmul_dtypes[0]
    for index in list(split.prefix) + [split.blocks[0]] + list(split.suffix):
        layer_options = list(dict.fromkeys(options + inst.block_options())) if index == split.blocks[0] else options
        for option, sp in itertools.product(layer_options, sps):
            inst.costs[index, option, sp] = config_layer_cost(
                profile.layers[index], option, cluster, base, sp, seq_len=profile.seq_len
            )
    return inst


def _float8_is_faster(profile: ModelProfile, cluster: ClusterSpec, split: LayerSplit, base: ParallelConfig) -> bool:
    """Whether a block runs faster with float8 matmuls (their casts included). They change no
    memory term, so where they are faster they dominate and the MILP need not offer both."""
    block = profile.layers[split.blocks[0]]
    float8, exact = (
        config_layer_cost(block, option, cluster, base, seq_len=profile.seq_len).time_s
        for option in (layer_option("none", None, FLOAT8), "none")
    )
    return float8 < exact


def lower_bound_s(inst: Instance) -> float:
    """Perfect balance (but the slowest rank holds >= ceil(N/p) blocks and the first and
    last ranks their pinned layers plus a block), the largest v allowed (and, on shared cores,
    the critical path at alone speed), the cheapest
    recompute/SP option per layer, and per ZeRO option only the unavoidable
    `overlap_penalty` share of its communication."""
    split, base, pp = inst.split, inst.base, inst.pp
    m = base.num_micro_batches
    block = split.blocks[0]

    def cheapest(index: int, field_name: str, options=None) -> float:
        return min(getattr(inst.costs[index, o, q], field_name) for o in (options or inst.options) for q in inst.sps)

    fixed = split.prefix + split.suffix
    total_s = len(split.blocks) * cheapest(block, "time_s", inst.block_options()) + sum(
        cheapest(i, "time_s") for i in fixed
    )
    zero3_exposed_s = len(split.blocks) * cheapest(block, "zero3_exposed_s", inst.block_options()) + sum(
        cheapest(i, "zero3_exposed_s") for i in fixed
    )
    params = total_local_params(inst)
    sync_units, penalty = total_over_layers(inst, "sync_units"), overlap_penalty(inst.cluster)
    speedup = bubble_speedup(inst.cluster.device)
    v = max(s[1] for s in inst.schedules)
    p2p = p2p_time_s(inst.profile, inst.cluster, inst.config(("1f1b", 1), 0, inst.sps[-1]))
    block_s = cheapest(block, "time_s", inst.block_options())
    ends_s = [sum(cheapest(i, "time_s") for i in inst.rank_fixed_layers(rank)) for rank in (0, pp - 1)]
    # the slowest rank holds at least ceil(N / p) blocks, and the first/last rank at least one
    slowest_s = max(math.ceil(len(split.blocks) / pp) * block_s, block_s + max(ends_s))
    bounds = []
    for zero in inst.zeros:
        config = inst.config(("1f1b", 1), zero, False)
        busy = total_s + (zero3_exposed_s if zero == 3 else 0.0)
        slowest = max(busy / pp, slowest_s)
        ramp, outright = pipeline_sends(config, inst.cluster.device.shared_core_slowdown > 1)  # v = 1: the fewest
        pipeline = max(((m - 1 / v) * slowest + busy / v) / speedup + ramp * p2p, m * busy / pp) + outright * p2p
        per_param, latency = dp_sync_coefficients(inst.cluster, config, zero)
        shard = params / pp / (base.dp if zero >= 1 else 1)
        extra = (
            penalty * (per_param * params + latency * sync_units) / pp
            + estimate_optimizer_step_s(shard, inst.cluster.device, base.param_dtype)
            + dtensor_step_s_per_tensor(inst.cluster, config, zero) * total_over_layers(inst, "param_tensors") / pp
        )
        extra += step_collectives_s(inst.profile, inst.cluster, config)
        inst.zero_bounds_s[zero] = pipeline + extra
        if state_memory_lower_bound(inst, zero, params) <= inst.cap_bytes:
            bounds.append(pipeline + extra)
    return min(bounds, default=math.inf)


def state_memory_lower_bound(inst: Instance, zero: int, params: float) -> float:
    """Average model-state bytes over the pipeline ranks plus the fixed per-device terms."""
    per_param = model_state_bytes_per_param(inst.base.param_dtype)
    sharded = (
        sum(per_param.values())
        if zero == 0
        else (
            per_param["params_bytes"] + (sum(per_param.values()) - per_param["params_bytes"]) / inst.base.dp
            if zero < 3
            else sum(per_param.values()) / inst.base.dp
        )
    )
    return params / inst.pp * sharded + inst.cluster.device.framework_overhead_bytes


@dataclass(frozen=True)
class Combo:
    """One (schedule, v, ZeRO stage, sequence parallel) combination, selected by u_c."""

    schedule: str
    v: int
    zero: int
    sp: bool

    @property
    def name(self) -> str:
        return f"{self.schedule}_v{self.v}_z{self.zero}_sp{int(self.sp)}"


def combinations(inst: Instance, incumbent_s: float | None = None) -> list[Combo]:
    """Every (schedule, ZeRO, SP) the instance allows whose model states can fit and
    whose ZeRO lower bound is below the incumbent. Dominated choices are left out unless
    pinned: GPipe costs what 1F1B costs and holds more activations; with tp > 1,
    sequence parallelism moves the same bytes, does less elementwise work and keeps
    fewer activations than no sequence parallelism."""
    schedules = [k for k in inst.schedules if k[0] != "gpipe"] or inst.schedules
    sps = [q for q in inst.sps if q] or inst.sps
    params = total_local_params(inst)
    return [
        Combo(k[0], k[1], z, q)
        for k in schedules
        for z in inst.zeros
        for q in sps
        if state_memory_lower_bound(inst, z, params) <= inst.cap_bytes
        and (incumbent_s is None or inst.zero_bounds_s.get(z, 0.0) < incumbent_s)
    ]


def total_over_layers(inst: Instance, field_name: str) -> float:
    """A per-layer cost that no recompute or SP choice changes, summed over the model."""
    split, option, sp = inst.split, inst.options[0], inst.sps[0]
    return len(split.blocks) * getattr(inst.costs[split.blocks[0], option, sp], field_name) + sum(
        getattr(inst.costs[j, option, sp], field_name) for j in split.prefix + split.suffix
    )


def total_local_params(inst: Instance) -> float:
    return total_over_layers(inst, "local_params")
