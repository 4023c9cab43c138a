"""The planner: one MILP per (mesh, micro-batch size), solved with HiGHS through PuLP.

Outer loop. Meshes dp * pp * tp = world size with tp a divisor of devices_per_node
(placed inside a node) dividing every `tp_divisors` value, pp <= repeated blocks;
micro-batch sizes b with global_batch % (dp * b) == 0. Pairs are visited in order of
a lower bound (perfect balance, the smallest bubble the schedules allow, the cheapest
ZeRO option's unavoidable communication) and pruned once the bound reaches the
incumbent; pairs whose model states cannot fit even fully sharded are skipped.

Layers. The longest run of layers with one `signature` is the repeated body
(N blocks); layers before it (embeddings) are pinned to the first stage, layers after
it (final norm, head) to the last stage. Blocks are identical, so a pipeline rank's
share is an integer count per recompute option and the MILP does not grow with depth.

Configurations. A combination c = (schedule, v, ZeRO stage, sequence parallelism) is
chosen by a binary u_c (sum_c u_c = 1). Combinations dominated in time and memory are
not offered unless pinned (GPipe by 1F1B; SP off by SP on when tp > 1), nor those
whose model states cannot fit or whose ZeRO lower bound exceeds the incumbent.

Variables (rank i < p, recompute option o, combination c):
    u_c in {0,1}           the configuration
    n[i,o,c] in Z+         blocks of rank i recomputed with o, under c (0 unless u_c = 1)
    r[j,o,c] in {0,1}      recompute option o of pinned prefix/suffix layer j, under c
    X[i,c] >= 0            ZeRO-3 traffic of rank i not hidden behind its compute
    E[i,c] >= 0            dp gradient sync of rank i not hidden behind its backward
    Tmax_c >= 0            slowest rank's time per micro-batch under c
    P_c >= 0               the pipeline's time under c (two bounds, below)
    W >= 0                 worst rank's exposed sync + optimizer step
Every per-rank quantity is linear in the counts: time_i,c = sum_o n[i,o,c] t(o, sp_c)
+ sum_j,o r[j,o,c] t_j(o, sp_c), likewise backward, activation bytes, parameters and
ZeRO-3 traffic, with coefficients from `costmodels.pipeline.estimate_layer_cost`.
Objective (= `costmodels.pipeline.estimate_step`, checked by the planner tests):
    min sum_c [P_c + (2 p2p_c (m v_c + p - 1) + step collectives_c) u_c]  +  W
    P_c >= ((m - 1/v_c) Tmax_c + (1/v_c) B_c) / s,   B_c = sum_i (time_i,c + X_i,c)
    P_c >= m B_c / p                                 (only where ranks share cores, s > 1)
Linearisation: the configuration binary enters by big-M on the counts
(n[i,o,c] <= N u_c, sum_o r[j,o,c] = u_c), i.e. the disaggregated (convex-hull) form of
the disjunction over configurations (Balas 1979): every constraint written per c with
its own copy of the counts holds trivially when u_c = 0, so memory, time and sync
constraints need no further big-M and the LP relaxation stays tight. Constraint
families (`Milp.add_*_constraints`, each named): assignment, time (ZeRO-3 exposure,
slowest rank), sync (dp sync exposure + optimizer), memory (per rank and combination:
states + in-flight * activations + fixed terms <= cap * u_c).

A pinned field restricts the options above; a fully pinned configuration is evaluated by
the same MILP, which then only places layers (stage boundaries and per-layer recompute
are not Constraints fields). HiGHS solves each MILP to MIP_GAP, with the incumbent step
time as objective bound and MILP_TIME_LIMIT_S as a guard (counted in the stats).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import pulp

from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import RECOMPUTE_OPTIONS, Constraints
from autoplan.costmodels.compute import estimate_optimizer_step_s
from autoplan.costmodels.memory import in_flight_micro_batches, model_state_bytes_per_param
from autoplan.costmodels.pipeline import (LayerCost, ParallelConfig, StepEstimate, dp_sync_coefficients,
                                          dtensor_step_s_per_tensor, estimate_layer_cost, estimate_step,
                                          fixed_memory_bytes, overlap_penalty, p2p_time_s, step_collectives_s)
from autoplan.schema.profile import ModelProfile

GB = 1e9
VIRTUAL_STAGE_OPTIONS = (2, 4)
ZERO_OPTIONS = (0, 1, 3)  # ZeRO-2 costs what ZeRO-1 does (memory.py); planned only when pinned
MAX_MICRO_BATCH_SIZE = 64
MIP_GAP = 1e-4
"""Relative optimality gap at which a MILP counts as solved."""
MILP_TIME_LIMIT_S = (0.6, 0.25)
"""Per-MILP time limit for the first FIRST_MILPS instances (the most promising by lower
bound, where the best plan almost always is) and for the rest; an instance stopped by
it returns its incumbent (counted in the solver stats as `milps_time_limited`)."""
FIRST_MILPS = 4


@functools.cache
def highs_available() -> bool:
    """Whether PuLP finds HiGHS (else CBC solves); asked once, on the first solve."""
    available = pulp.HiGHS(msg=False).available()
    if available:
        _silence_highs_banner()
    return available


def _silence_highs_banner() -> None:
    """highspy prints a copyright banner to the C stdout when the first solver object is
    made, before PuLP can switch output off; make that first object with stdout closed
    (once, on the first solve: importing this module changes nothing)."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)




@dataclass
class Solution:
    """One fully specified plan and its prediction."""

    config: ParallelConfig
    rank_layers: list[list[tuple[int, str]]]
    """Per pipeline rank: (layer index, recompute option), in model order."""
    estimate: StepEstimate


@dataclass
class Rejected:
    """A (mesh, micro-batch) pair that lost, and why."""

    config: ParallelConfig
    step_time_s: float | None
    peak_memory_bytes: float | None
    why: str
    recompute: str = "-"
    instance: "Instance | None" = None
    """Set when memory ruled the pair out (to say how much it would need)."""


@dataclass
class SolveResult:
    best: Solution
    runners_up: list[Rejected]
    stats: dict[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSplit:
    """prefix (pinned to rank 0) + N identical blocks + suffix (pinned to the last rank).
    Pipeline stages are cut only between blocks; `cut_blocker` says why they cannot be
    (None: any two neighbouring blocks may be cut apart)."""

    prefix: tuple[int, ...]
    blocks: tuple[int, ...]
    suffix: tuple[int, ...]
    cut_blocker: str | None = None

    @property
    def num_cuttable_blocks(self) -> int:
        """The most pipeline stages the blocks can be cut into."""
        return len(self.blocks) if self.cut_blocker is None else 1


def split_layers(profile: ModelProfile) -> LayerSplit:
    """The repeated body: the longest run of equal signatures that a stage may be cut
    anywhere inside (`ModelProfile.stage_start_blockers`), the first such run on ties; when
    no two equal neighbours may be cut apart, the longest run, uncuttable."""
    layers, blockers = profile.layers, profile.stage_start_blockers
    runs, cuttable = [], []  # (start, length) of runs of equal signatures; of runs also cuttable inside
    for index, layer in enumerate(layers):
        if runs and layer.signature == layers[index - 1].signature:
            runs[-1][1] += 1
            if layer.name in blockers:
                cuttable.append([index, 1])
            else:
                cuttable[-1][1] += 1
        else:
            runs.append([index, 1])
            cuttable.append([index, 1])
    start, length = max(cuttable, key=lambda run: (run[1], -run[0]))
    blocker = None
    if length == 1:
        start, length = max(runs, key=lambda run: (run[1], -run[0]))
        blocker = next((blockers[layers[i].name] for i in range(start + 1, start + length)
                        if layers[i].name in blockers), None)
    return LayerSplit(tuple(range(start)), tuple(range(start, start + length)),
                      tuple(range(start + length, len(layers))), blocker)


# ----------------------------------------------------------------------- enumeration
def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def can_sequence_parallel(profile: ModelProfile) -> bool:
    """Whether the trace found a region sequence parallelism can run (an entry site)."""
    return any(site.style == "sequence_parallel_entry" for layer in profile.layers for site in layer.tp_sites.values())


def check_tp(profile: ModelProfile, tp: int) -> str | None:
    """Why `tp` cannot split the model, or None."""
    if tp > 1 and not any(layer.tp_param_count for layer in profile.layers):
        return f"tp={tp}: tensor parallelism finds nothing to split in this model (no Linear pairs, heads or vocabulary)"
    for layer in profile.layers:
        for name, value in layer.tp_divisors.items():
            if value % tp:
                return f"tp={tp} does not divide {name}={value}"
    return None


def enumerate_meshes(profile: ModelProfile, cluster: ClusterSpec, constraints: Constraints,
                     num_blocks: int, cut_blocker: str | None = None) -> list[tuple[int, int, int]]:
    """(dp, pp, tp) candidates honouring the pins; pinned values are validated loudly."""
    world = cluster.world_size
    pins = {axis: getattr(constraints, axis) for axis in ("dp", "pp", "tp")}
    if pins["tp"] and check_tp(profile, pins["tp"]):
        raise ValueError(check_tp(profile, pins["tp"]))
    if all(pins.values()) and pins["dp"] * pins["tp"] * pins["pp"] != world:
        raise ValueError(f"dp({pins['dp']}) * tp({pins['tp']}) * pp({pins['pp']}) = "
                         f"{pins['dp'] * pins['tp'] * pins['pp']} != world_size({world})")
    for axis, value in pins.items():
        if value and world % value:
            raise ValueError(f"{axis}={value} does not divide world_size({world})")
    if pins["tp"]:
        tps = [pins["tp"]]
    else:
        tps = [t for t in _divisors(cluster.devices_per_node) if world % t == 0 and not check_tp(profile, t)]
    meshes = []
    for tp in tps:
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            if (pins["pp"] or pp) != pp or (pins["dp"] or dp) != dp:
                continue
            if pp > num_blocks and not pins["pp"]:
                continue
            meshes.append((dp, pp, tp))
    if not meshes:
        raise ValueError(f"no mesh dp * pp * tp = world_size({world}) satisfies the pins "
                         f"{ {k: v for k, v in pins.items() if v} }")
    for dp, pp, tp in meshes:
        if pp > num_blocks:
            raise ValueError(f"pp={pp} exceeds the {num_blocks} repeated blocks the model can be cut into"
                             + (f": {cut_blocker}" if cut_blocker else ""))
    return meshes


def micro_batch_sizes(global_batch: int, dp: int, pinned: int | None) -> list[int]:
    """b such that global_batch % (dp * b) == 0."""
    if pinned:
        if global_batch % (dp * pinned):
            raise ValueError(f"global batch {global_batch} is not divisible by dp({dp}) * "
                             f"micro_batch_size({pinned}) = {dp * pinned}")
        return [pinned]
    if global_batch % dp:
        return []
    return [b for b in _divisors(global_batch // dp) if b <= MAX_MICRO_BATCH_SIZE]


def schedule_options(pp: int, num_micro_batches: int, num_blocks: int,
                     constraints: Constraints) -> list[tuple[str, int]]:
    """(schedule, virtual stages) choices: 1F1B needs m >= pp and interleaving m % pp == 0
    (torch.distributed.pipelining, as Megatron-LM) and at least v blocks per rank."""
    if pp == 1:
        options = [(constraints.schedule or "1f1b", 1)]
    else:
        virtual = [constraints.virtual_stages] if constraints.virtual_stages else list(VIRTUAL_STAGE_OPTIONS)
        # torch's Schedule1F1B needs at least one micro-batch per pipeline rank.
        options = [("gpipe", 1)] + ([("1f1b", 1)] if num_micro_batches >= pp else []) + [
            ("interleaved_1f1b", v) for v in virtual
            if v > 1 and num_blocks >= pp * v and num_micro_batches % pp == 0]
        if constraints.schedule:
            options = [o for o in options if o[0] == constraints.schedule]
        if constraints.virtual_stages and constraints.schedule != "interleaved_1f1b":
            options = [o for o in options if o[1] == constraints.virtual_stages]
    return options


# ----------------------------------------------------------------------- one (mesh, mbs) instance
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
    """Pinned recompute of the repeated blocks."""
    zero_bounds_s: dict[int, float] = field(default_factory=dict)
    """Lower bound on the step time per ZeRO stage (filled by `lower_bound_s`)."""

    @property
    def pp(self) -> int:
        return self.base.pp

    def rank_fixed_layers(self, rank: int) -> list[int]:
        fixed = list(self.split.prefix) if rank == 0 else []
        return fixed + (list(self.split.suffix) if rank == self.pp - 1 else [])

    def block_options(self) -> list[str]:
        return [self.block_option] if self.block_option else self.options

    def config(self, schedule: tuple[str, int], zero: int, sp: bool) -> ParallelConfig:
        return ParallelConfig(**{**self.base.__dict__, "schedule": schedule[0], "virtual_stages": schedule[1],
                                 "zero_stage": zero, "sequence_parallel": sp})


def build_instance(profile: ModelProfile, cluster: ClusterSpec, split: LayerSplit, mesh: tuple[int, int, int],
                   micro_batch_size: int, constraints: Constraints, param_dtype: str,
                   grad_reduce_dtype: str) -> Instance | None:
    dp, pp, tp = mesh
    m = profile.global_batch_size // (dp * micro_batch_size)
    schedules = schedule_options(pp, m, len(split.blocks), constraints)
    if not schedules:
        return None
    zeros = [constraints.zero_stage] if constraints.zero_stage is not None else (list(ZERO_OPTIONS) if dp > 1 else [0])
    sps = [False, True] if tp > 1 and can_sequence_parallel(profile) else [False]
    if constraints.sequence_parallel is not None:
        sps = [constraints.sequence_parallel and tp > 1]
    options = [o for o in RECOMPUTE_OPTIONS if all(o in layer.saved_bytes for layer in profile.layers)]
    if constraints.recompute and constraints.recompute not in options:
        raise ValueError(f"recompute={constraints.recompute!r} is not available; the profile offers {options}")
    base = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=micro_batch_size, num_micro_batches=m,
                          param_dtype=param_dtype, grad_reduce_dtype=grad_reduce_dtype)
    costs = {}
    representatives = list(split.prefix) + [split.blocks[0]] + list(split.suffix)
    for index, option, sp in itertools.product(representatives, options, sps):
        costs[index, option, sp] = estimate_layer_cost(
            profile.layers[index], option, cluster, dp=dp, tp=tp, micro_batch_size=micro_batch_size,
            sequence_parallel=sp, param_dtype=param_dtype, grad_reduce_dtype=grad_reduce_dtype)
    return Instance(profile, cluster, split, base, options, schedules, zeros, sps, costs,
                    constraints.max_memory_fraction * cluster.device.memory_bytes, constraints.recompute)


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
        cheapest(i, "time_s") for i in fixed)
    params, zero3_s = total_local_params(inst), total_over_layers(inst, "zero3_comm_s")
    sync_units, penalty = total_over_layers(inst, "sync_units"), overlap_penalty(inst.cluster)
    slowdown = inst.cluster.device.shared_core_slowdown
    v = max(s[1] for s in inst.schedules)
    p2p = p2p_time_s(inst.profile, inst.cluster, inst.config(("1f1b", 1), 0, inst.sps[-1]))
    block_s = cheapest(block, "time_s", inst.block_options())
    ends_s = [sum(cheapest(i, "time_s") for i in inst.rank_fixed_layers(rank)) for rank in (0, pp - 1)]
    # the slowest rank holds at least ceil(N / p) blocks, and the first/last rank at least one
    slowest_s = max(math.ceil(len(split.blocks) / pp) * block_s, block_s + max(ends_s))
    bounds = []
    for zero in inst.zeros:
        config = inst.config(("1f1b", 1), zero, False)
        zero3_share = penalty * zero3_s if zero == 3 else 0.0
        busy = total_s + zero3_share
        slowest = max(busy / pp, slowest_s)
        pipeline = max(((m - 1 / v) * slowest + busy / v) / slowdown, m * busy / pp) + (
            2 * p2p * (m + pp - 1) if pp > 1 else 0.0)
        per_param, latency = dp_sync_coefficients(inst.cluster, config, zero)
        shard = params / pp / (base.dp if zero >= 1 else 1)
        extra = penalty * (per_param * params + latency * sync_units) / pp + estimate_optimizer_step_s(
            shard, inst.cluster.device, base.param_dtype) + dtensor_step_s_per_tensor(
            inst.cluster, config, zero) * total_over_layers(inst, "param_tensors") / pp
        extra += step_collectives_s(inst.profile, inst.cluster, config)
        inst.zero_bounds_s[zero] = pipeline + extra
        if state_memory_lower_bound(inst, zero, params) <= inst.cap_bytes:
            bounds.append(pipeline + extra)
    return min(bounds, default=math.inf)


def state_memory_lower_bound(inst: Instance, zero: int, params: float) -> float:
    """Average model-state bytes over the pipeline ranks plus the fixed per-device terms."""
    per_param = model_state_bytes_per_param(inst.base.param_dtype)
    sharded = sum(per_param.values()) if zero == 0 else (
        per_param["params_bytes"] + (sum(per_param.values()) - per_param["params_bytes"]) / inst.base.dp
        if zero < 3 else sum(per_param.values()) / inst.base.dp)
    return params / inst.pp * sharded + inst.cluster.device.framework_overhead_bytes


# ----------------------------------------------------------------------- the MILP
class Milp:
    """The MILP of one Instance; `add_*_constraints` add one family each."""

    def __init__(self, inst: Instance, incumbent_s: float | None = None):
        self.inst = inst
        self.incumbent_s = incumbent_s
        self.problem = pulp.LpProblem("autoplan", pulp.LpMinimize)
        self.combos = combinations(inst, incumbent_s)
        p, N = inst.pp, len(inst.split.blocks)
        # PuLP >= 3.3 attaches variables to the problem (LpVariable(...) is deprecated there)
        var = getattr(self.problem, "add_variable", None) or pulp.LpVariable
        self.u = {c: var(f"u_{c.name}", cat="Binary") for c in self.combos}
        self.n = {(i, o, c): var(f"n_{i}_{o}_{c.name}", lowBound=0, upBound=N, cat="Integer")
                  for i in range(p) for o in inst.block_options() for c in self.combos}
        self.r = {(j, o, c): var(f"r_{j}_{o}_{c.name}", cat="Binary")
                  for j in inst.split.prefix + inst.split.suffix for o in inst.options for c in self.combos}
        cont = lambda name: var(name, lowBound=0)  # noqa: E731
        self.X = {(i, c): cont(f"X_{i}_{c.name}") for i in range(p) for c in self.combos if c.zero == 3}
        self.E = {(i, c): cont(f"E_{i}_{c.name}") for i in range(p) for c in self.combos if c.zero != 3}
        self.Tmax = {c: cont(f"Tmax_{c.name}") for c in self.combos}
        self.P = {c: cont(f"P_{c.name}") for c in self.combos}
        self.W = cont("W")
        self._sums: dict = {}

    def rank_sum(self, i: int, c: Combo, field_name: str, scale: float = 1.0) -> pulp.LpAffineExpression:
        """sum over rank i's layers (under combination c) of a per-layer cost (a fresh copy)."""
        key = (i, c, field_name)
        if key not in self._sums:
            inst = self.inst
            block = inst.split.blocks[0]
            terms = [(self.n[i, o, c], getattr(inst.costs[block, o, c.sp], field_name)) for o in inst.block_options()]
            for j in inst.rank_fixed_layers(i):
                terms += [(self.r[j, o, c], getattr(inst.costs[j, o, c.sp], field_name)) for o in inst.options]
            self._sums[key] = [(var, coef) for var, coef in terms if coef]
        return pulp.LpAffineExpression([(var, coef * scale) for var, coef in self._sums[key]])

    def busy(self, i: int, c: Combo) -> pulp.LpAffineExpression:
        """T_i,c + X_i,c: rank i's time per micro-batch with exposed ZeRO-3 traffic."""
        time_s = self.rank_sum(i, c, "time_s")
        return time_s + self.X[i, c] if c.zero == 3 else time_s

    def add_assignment_constraints(self) -> None:
        """sum_c u_c = 1;  sum_{i,o} n[i,o,c] = N u_c;  n[i,o,c] <= N u_c;
        sum_o r[j,o,c] = u_c;  sum_o n[i,o,c] >= v_c u_c (a block per virtual stage)."""
        inst, prob, N = self.inst, self.problem, len(self.inst.split.blocks)
        prob += pulp.lpSum(self.u.values()) == 1, "one_configuration"
        for c in self.combos:
            prob += pulp.lpSum(self.n[i, o, c] for i in range(inst.pp) for o in inst.block_options()) \
                == N * self.u[c], f"blocks_all_placed_{c.name}"
            for i in range(inst.pp):
                prob += pulp.lpSum(self.n[i, o, c] for o in inst.block_options()) >= c.v * self.u[c], \
                    f"blocks_per_virtual_stage_{i}_{c.name}"
                for o in inst.block_options():
                    prob += self.n[i, o, c] <= N * self.u[c], f"counts_vanish_{i}_{o}_{c.name}"
            for j in inst.split.prefix + inst.split.suffix:
                prob += pulp.lpSum(self.r[j, o, c] for o in inst.options) == self.u[c], f"recompute_once_{j}_{c.name}"

    def add_time_constraints(self) -> None:
        """ZeRO-3: X_i,c >= (1 - pen)(comm_i,c - T_i,c) + pen comm_i,c,  X_i,c >= pen comm_i,c;
        Tmax_c >= T_i,c + X_i,c for every rank i."""
        penalty = overlap_penalty(self.inst.cluster)
        for c in self.combos:
            for i in range(self.inst.pp):
                if c.zero == 3:
                    comm = self.rank_sum(i, c, "zero3_comm_s")
                    time_s = self.rank_sum(i, c, "time_s")
                    self.problem += self.X[i, c] >= (1 - penalty) * (comm - time_s) + penalty * comm, \
                        f"zero3_exposed_{i}_{c.name}"
                    self.problem += self.X[i, c] >= penalty * comm, f"zero3_hidden_share_{i}_{c.name}"
                self.problem += self.Tmax[c] >= self.busy(i, c), f"slowest_rank_{i}_{c.name}"

    def pipeline_expression(self) -> pulp.LpAffineExpression:
        """sum_c P_c + (2 p2p_c (m v_c + p - 1) + step collectives_c) u_c, with B_c = sum_i (T_i,c + X_i,c) and
        P_c >= ((m - 1/v_c) Tmax_c + B_c / v_c) / s,  P_c >= m B_c / p
        (s = device.shared_core_slowdown, 1 on GPUs, where the first bound always binds;
        costmodels.pipeline)."""
        inst = self.inst
        m, p = inst.base.num_micro_batches, inst.pp
        slowdown = inst.cluster.device.shared_core_slowdown
        terms = []
        for c in self.combos:
            config = inst.config((c.schedule, c.v), c.zero, c.sp)
            p2p = p2p_time_s(inst.profile, inst.cluster, config)
            # the per-step collectives depend on the ZeRO stage (DDP's first bucket): per combination
            comm = (2 * p2p * (m * c.v + p - 1) if p > 1 else 0.0) + step_collectives_s(inst.profile, inst.cluster,
                                                                                        config)
            busy = pulp.lpSum(self.busy(i, c) for i in range(p))
            self.problem += self.P[c] >= ((m - 1 / c.v) * self.Tmax[c] + (1 / c.v) * busy) * (1 / slowdown), \
                f"pipeline_critical_path_{c.name}"
            if slowdown > 1:
                self.problem += self.P[c] >= (m / p) * busy, f"pipeline_shared_cores_{c.name}"
            terms.append(self.P[c] + comm * self.u[c])
        return pulp.lpSum(terms)

    def add_sync_constraints(self) -> None:
        """sync_i,c = a_z params_i,c + b_z units_i,c (layers holding parameters);
        E_i,c >= sync_i,c - backward_i,c;
        W >= sum_c (1 - pen) E_i,c + pen sync_i,c + optimizer_i,c  for every rank i."""
        inst = self.inst
        penalty = overlap_penalty(inst.cluster)
        opt_per_param = estimate_optimizer_step_s(1.0, inst.cluster.device, inst.base.param_dtype)
        for i in range(inst.pp):
            total = []
            for c in self.combos:
                config = inst.config(("1f1b", 1), c.zero, c.sp)
                params = self.rank_sum(i, c, "local_params")
                total.append(opt_per_param / (inst.base.dp if c.zero >= 1 else 1) * params)
                per_tensor = dtensor_step_s_per_tensor(inst.cluster, config, c.zero)
                if per_tensor:
                    total.append(per_tensor * self.rank_sum(i, c, "param_tensors"))
                per_param, latency = dp_sync_coefficients(inst.cluster, config, c.zero)
                if per_param:
                    sync = per_param * params + latency * self.rank_sum(i, c, "sync_units")
                    self.problem += self.E[i, c] >= sync - self.rank_sum(i, c, "backward_s"), \
                        f"dp_sync_exposed_{i}_{c.name}"
                    total.append((1 - penalty) * self.E[i, c] + penalty * sync)
            self.problem += self.W >= pulp.lpSum(total), f"sync_and_optimizer_{i}"

    def add_memory_constraints(self) -> None:
        """states_z params_i,c + inflight_c(i) act_i,c + (fixed_i,c + gathered_z) u_c <= cap u_c  (GB)."""
        inst, base = self.inst, self.inst.base
        terms = model_state_bytes_per_param(base.param_dtype)
        for i in range(inst.pp):
            layers = [inst.profile.layers[j] for j in inst.rank_fixed_layers(i) + [inst.split.blocks[0]]]
            fixed_of = {z: sum(fixed_memory_bytes(inst.profile, inst.cluster, base, layers, z).values())
                        for z in inst.zeros}
            for c in self.combos:
                per_param = sum(v if (c.zero == 0 or (c.zero < 3 and name == "params_bytes")) else v / base.dp
                                for name, v in terms.items())
                fixed = fixed_of[c.zero]
                in_flight = in_flight_micro_batches(c.schedule, i, inst.pp, base.num_micro_batches, c.v)
                self.problem += (per_param * self.rank_sum(i, c, "local_params", 1 / GB)
                                 + in_flight * self.rank_sum(i, c, "activation_bytes", 1 / GB)
                                 <= (inst.cap_bytes - fixed) / GB * self.u[c]), f"memory_{i}_{c.name}"

    def solve(self, time_limit_s: float = MILP_TIME_LIMIT_S[0]) -> bool:
        """Build and solve; True when a plan was found (`self.proven`: optimal within MIP_GAP).
        The incumbent (the best step time so far) is handed to HiGHS as an objective bound."""
        incumbent_s = self.incumbent_s
        if not self.combos:
            self.proven = True
            return False
        self.add_assignment_constraints()
        self.add_time_constraints()
        self.add_sync_constraints()
        self.add_memory_constraints()
        self.problem += self.pipeline_expression() + self.W, "step_time_s"
        if highs_available():
            options = {"mip_heuristic_effort": 0.3}
            if incumbent_s is not None:
                options["objective_bound"] = incumbent_s
            solver = pulp.HiGHS(msg=False, gapRel=MIP_GAP, timeLimit=time_limit_s, **options)
        else:
            solver = pulp.PULP_CBC_CMD(msg=False, gapRel=MIP_GAP, timeLimit=time_limit_s)
        status = self.problem.solve(solver)
        self.proven = self.problem.sol_status == pulp.LpSolutionOptimal
        return pulp.LpStatus[status] == "Optimal" and self.problem.sol_status in (
            pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)

    def solution(self) -> Solution:
        """Read back the chosen configuration and layer placement, evaluated by the cost model."""
        inst = self.inst
        c = max(self.combos, key=lambda combo: self.u[combo].value() or 0)
        config = inst.config((c.schedule, c.v), c.zero, c.sp)
        counts = [{o: int(round(self.n[i, o, c].value() or 0)) for o in inst.block_options()} for i in range(inst.pp)]
        choice = {j: max(inst.options, key=lambda o: self.r[j, o, c].value() or 0)
                  for j in inst.split.prefix + inst.split.suffix}
        return place_layers(inst, config, counts, choice)


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
    return [Combo(k[0], k[1], z, q) for k in schedules for z in inst.zeros for q in sps
            if state_memory_lower_bound(inst, z, params) <= inst.cap_bytes
            and (incumbent_s is None or inst.zero_bounds_s.get(z, 0.0) < incumbent_s)]


def total_over_layers(inst: Instance, field_name: str) -> float:
    """A per-layer cost that no recompute or SP choice changes, summed over the model."""
    split, key = inst.split, (inst.options[0], inst.sps[0])
    return len(split.blocks) * getattr(inst.costs[(split.blocks[0], *key)], field_name) + sum(
        getattr(inst.costs[(j, *key)], field_name) for j in split.prefix + split.suffix)


def total_local_params(inst: Instance) -> float:
    return total_over_layers(inst, "local_params")


def place_layers(inst: Instance, config: ParallelConfig, counts: list[dict[str, int]],
                 fixed_choice: dict[int, str]) -> Solution:
    """Blocks in model order, rank by rank (fuller recompute first inside a rank), evaluated."""
    blocks = iter(inst.split.blocks)
    rank_layers = []
    for i, per_option in enumerate(counts):
        entries = [(j, fixed_choice[j]) for j in inst.split.prefix] if i == 0 else []
        for option in ("full", "selective", "none"):
            entries += [(next(blocks), option) for _ in range(per_option.get(option, 0))]
        if i == inst.pp - 1:
            entries += [(j, fixed_choice[j]) for j in inst.split.suffix]
        rank_layers.append(entries)
    return Solution(config, rank_layers, estimate_step(inst.profile, inst.cluster, config, rank_layers))


def balanced_counts(num_blocks: int, pp: int, option: str) -> list[dict[str, int]]:
    """Equal blocks per rank; the remainder goes to the ranks after the first, which
    holds the embeddings."""
    extra = [1 if 0 < (i - 1) % pp + 1 <= num_blocks % pp else 0 for i in range(pp)] if pp > 1 else [0]
    return [{option: num_blocks // pp + extra[i]} for i in range(pp)]


def heuristic_solution(inst: Instance, combos: list[Combo]) -> Solution | None:
    """A quick feasible plan to start from: balanced blocks, one recompute option for all
    (the fastest that fits), per configuration combination. It is a real plan evaluated
    by the cost model, so it is a valid incumbent; the MILP then only has to beat it."""
    if len(inst.split.blocks) < inst.pp * max((c.v for c in combos), default=1):
        combos = [c for c in combos if len(inst.split.blocks) >= inst.pp * c.v]
    block = inst.split.blocks[0]
    best = None
    for c in combos:
        options = sorted(inst.block_options(), key=lambda o: inst.costs[block, o, c.sp].time_s)
        for option in options:
            fixed = {j: option if option in inst.options else inst.options[-1]
                     for j in inst.split.prefix + inst.split.suffix}
            solution = place_layers(inst, inst.config((c.schedule, c.v), c.zero, c.sp),
                                    balanced_counts(len(inst.split.blocks), inst.pp, option), fixed)
            if solution.estimate.peak_memory_bytes <= inst.cap_bytes:
                if best is None or solution.estimate.step_time_s < best.estimate.step_time_s:
                    best = solution
                break
    return best


# ----------------------------------------------------------------------- driver
def default_dtypes(cluster: ClusterSpec, constraints: Constraints) -> tuple[str, str]:
    """bfloat16 on GPUs (mixed precision), float32 on CPUs, unless pinned."""
    if constraints.activation_dtype is not None:
        raise ValueError("activation_dtype (quantized activation storage) is not supported yet; "
                         "activations are stored in param_dtype — leave activation_dtype unset")
    default = "bfloat16" if cluster.device.kind == "cuda" else "float32"
    param = constraints.param_dtype or default
    return param, constraints.grad_reduce_dtype or param


def solve(profile: ModelProfile, cluster: ClusterSpec, constraints: Constraints | None = None) -> SolveResult:
    """The fastest plan that fits, and the runners-up.

    >>> result = solve(profile, ClusterSpec.preset("dgx-a100-80gb", num_nodes=2))   # doctest: +SKIP
    >>> result.best.config.mesh                                                       # doctest: +SKIP
    {'dp': 4, 'pp': 1, 'tp': 4}
    """
    started = time.perf_counter()
    constraints = constraints or Constraints()
    if constraints.sequence_parallel and not can_sequence_parallel(profile):
        raise ValueError(f"sequence_parallel=True cannot run on {profile.model_name}: "
                         f"{profile.sequence_parallel_blocker or 'no tensor-parallel region to split along the sequence'}")
    param_dtype, grad_dtype = default_dtypes(cluster, constraints)
    split = split_layers(profile)
    meshes = enumerate_meshes(profile, cluster, constraints, split.num_cuttable_blocks, split.cut_blocker)
    instances = []
    for mesh in meshes:
        for b in micro_batch_sizes(profile.global_batch_size, mesh[0], constraints.micro_batch_size):
            inst = build_instance(profile, cluster, split, mesh, b, constraints, param_dtype, grad_dtype)
            if inst is not None:
                instances.append((lower_bound_s(inst), inst))
    if not instances:
        raise ValueError(f"no (mesh, micro-batch size) divides global batch {profile.global_batch_size} "
                         f"over world_size({cluster.world_size}) with the pins {constraints.pinned()}")
    instances.sort(key=lambda pair: pair[0])
    solved: list[Solution] = []
    rejected: list[Rejected] = []
    best: Solution | None = None
    num_milps = time_limited = 0
    for bound, inst in instances:
        if best is not None and bound >= best.estimate.step_time_s:
            rejected.append(Rejected(inst.base, None, None,
                                     f"lower bound {bound:.3g} s >= best {best.estimate.step_time_s:.3g} s"))
            continue
        if math.isinf(bound):
            rejected.append(Rejected(inst.base, None, None, "model states alone exceed the memory cap",
                                     instance=inst))
            continue
        start = heuristic_solution(inst, combinations(inst, best.estimate.step_time_s if best else None))
        if start is not None:
            solved.append(start)
            if best is None or start.estimate.step_time_s < best.estimate.step_time_s:
                best = start
        milp = Milp(inst, best.estimate.step_time_s if best else None)
        num_milps += 1
        if not milp.solve(MILP_TIME_LIMIT_S[0] if num_milps <= FIRST_MILPS else MILP_TIME_LIMIT_S[1]):
            if start is not None:  # nothing better than the heuristic plan, already recorded
                continue
            if best is None:
                rejected.append(Rejected(inst.base, None, None, "no placement fits the memory cap", instance=inst))
            else:
                rejected.append(Rejected(inst.base, None, None,
                                         f"no placement that fits beats the best {best.estimate.step_time_s:.3g} s"))
            continue
        solution = milp.solution()
        time_limited += not milp.proven
        solved.append(solution)
        if best is None or solution.estimate.step_time_s < best.estimate.step_time_s:
            best = solution
    if best is None:
        raise infeasible_error(profile, cluster, split, instances, constraints)
    stats = {"solver": "HiGHS" if highs_available() else "CBC", "milps_solved": num_milps,
             "milps_time_limited": time_limited,
             "candidates": len(instances), "wall_time_s": time.perf_counter() - started}
    return SolveResult(best, runners_up(best, solved, rejected, constraints, cluster), stats)


def summary_recompute(solution: Solution) -> str:
    options = sorted({option for entries in solution.rank_layers for _, option in entries})
    return options[0] if len(options) == 1 else "mixed(" + ",".join(options) + ")"


def runners_up(best: Solution, solved: list[Solution], rejected: list[Rejected], constraints: Constraints,
               cluster: ClusterSpec, limit: int = 5) -> list[Rejected]:
    """The next fastest distinct configurations, then the memory-infeasible ones."""
    cap = constraints.max_memory_fraction * cluster.device.memory_bytes
    out, seen = [], {(best.config.mesh["dp"], best.config.mesh["pp"], best.config.micro_batch_size)}
    for solution in sorted(solved, key=lambda s: s.estimate.step_time_s):
        key = (solution.config.mesh["dp"], solution.config.mesh["pp"], solution.config.micro_batch_size)
        if solution is best or key in seen:
            continue
        seen.add(key)
        slower = solution.estimate.step_time_s / best.estimate.step_time_s - 1
        out.append(Rejected(solution.config, solution.estimate.step_time_s, solution.estimate.peak_memory_bytes,
                            f"slower by {slower:.1%}", summary_recompute(solution)))
    for item in rejected:
        if item.instance is not None and len(out) < limit:
            need = smallest_memory_plan(item.instance).estimate.peak_memory_bytes
            item.why = f"needs {need / GB:.1f} GB > {cap / GB:.1f} GB" if need > cap else item.why
            item.peak_memory_bytes = need
            out.append(item)
    pruned = [item for item in rejected if item.why.startswith("lower bound")]
    return (out + pruned)[:limit]


def smallest_memory_plan(inst: Instance) -> Solution:
    """Maximal sharding and recomputation, balanced: what the mesh needs at least."""
    option = "full" if "full" in inst.options else inst.options[-1]
    config = inst.config(("1f1b", 1) if inst.pp > 1 else inst.schedules[0], max(inst.zeros), inst.sps[-1])
    counts = balanced_counts(len(inst.split.blocks), inst.pp, inst.block_option or option)
    return place_layers(inst, config, counts, {j: option for j in inst.split.prefix + inst.split.suffix})


def infeasible_error(profile: ModelProfile, cluster: ClusterSpec, split: LayerSplit, instances,
                     constraints: Constraints) -> ValueError:
    smallest = min((smallest_memory_plan(inst) for _, inst in instances), key=lambda s: s.estimate.peak_memory_bytes)
    est = smallest.estimate
    cap = constraints.max_memory_fraction * cluster.device.memory_bytes
    rank = max(range(len(est.rank_memory)), key=lambda i: est.rank_memory_bytes[i])
    terms = ", ".join(f"{k.removesuffix('_bytes')} {v / GB:.2f} GB" for k, v in est.rank_memory[rank].items() if v)
    c = smallest.config
    return ValueError(
        f"no plan fits in memory: the smallest plan needs {est.peak_memory_bytes / GB:.2f} GB per device > "
        f"{cap / GB:.2f} GB (max_memory_fraction {constraints.max_memory_fraction} x "
        f"{cluster.device.memory_bytes / GB:.0f} GB); that plan is dp={c.dp} pp={c.pp} tp={c.tp} "
        f"micro_batch_size={c.micro_batch_size} ZeRO-{c.zero_stage} recompute=full; its worst rank holds {terms}")
