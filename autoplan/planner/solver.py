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
    E[i,c] >= 0            dp gradient sync of rank i not hidden behind its backward
    Tmax_c >= 0            slowest rank's time per micro-batch under c
    P_c >= 0               the pipeline's time under c (two bounds, below)
    W >= 0                 worst rank's exposed sync + optimizer step
    z[i,o,c] in {0,1}      rank i has blocks storing activations narrower with o (float8, ...)
    D[i,c] >= 0            the dequantized copies rank i's backward holds at once (GB)
Every per-rank quantity is linear in the counts: time_i,c = sum_o n[i,o,c] t(o, sp_c)
+ sum_j,o r[j,o,c] t_j(o, sp_c), likewise backward, activation bytes, parameters and
exposed ZeRO-3 traffic X_i,c (FSDP2 overlaps it layer by layer, so each layer's exposed share is
a coefficient), with coefficients from `costmodels.layer.estimate_layer_cost`.
Objective (= `costmodels.pipeline.estimate_step`, checked by the planner tests):
    min sum_c [P_c + (outright_c p2p_c + step collectives_c) u_c]  +  W
    P_c >= ((m - 1/v_c) Tmax_c + (1/v_c) B_c) / s,   B_c = sum_i (time_i,c + X_i,c)
    P_c >= m B_c / p                                 (only where ranks share cores, s > 1)
Linearisation: the configuration binary enters by big-M on the counts
(n[i,o,c] <= N u_c, sum_o r[j,o,c] = u_c), i.e. the disaggregated (convex-hull) form of
the disjunction over configurations (Balas 1979): every constraint written per c with
its own copy of the counts holds trivially when u_c = 0, so memory, time and sync
constraints need no further big-M and the LP relaxation stays tight. Constraint
families (`Milp.add_*_constraints`, each named): assignment, time (slowest rank), sync
(dp sync exposure + optimizer), memory (per rank and combination:
states + in-flight * activations + D + fixed terms <= cap * u_c), dequantize (D the largest
dequantized_o z[i,o,c], n[i,o,c] <= N z[i,o,c]; precision choices: `planner.precision`).

A pinned field restricts the options above; a fully pinned configuration is evaluated by
the same MILP, which then only places layers (stage boundaries and per-layer recompute
are not Constraints fields). HiGHS solves each MILP to MIP_GAP, with the incumbent step
time as objective bound and MILP_TIME_LIMIT_S as a guard (counted in the stats).

This module holds the MILP and the outer loop (runners-up and the infeasible error:
`planner.outcome`); the loop's search space (meshes, micro-batch
sizes, schedules, the repeated body) is `planner.search_space`, one candidate's data, its
combinations and its lower bound `planner.instance`, and plans from block counts (the
heuristic incumbent, the smallest-memory plan) `planner.placement`.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import pulp

from autoplan.costmodels.compute import estimate_optimizer_step_s
from autoplan.costmodels.memory import in_flight_micro_batches, model_state_bytes_per_param
from autoplan.costmodels.pipeline import (
    bubble_speedup,
    dp_sync_coefficients,
    dtensor_step_s_per_tensor,
    fixed_memory_bytes,
    overlap_penalty,
    p2p_time_s,
    pipeline_sends,
    step_collectives_s,
)
from autoplan.errors import AutoplanError
from autoplan.planner.instance import Combo, Instance, build_instance, combinations, lower_bound_s
from autoplan.planner.outcome import Rejected, infeasible_error, runners_up
from autoplan.planner.placement import Solution, heuristic_solution, place_layers
from autoplan.planner.precision import param_dtype_options, precision_choices
from autoplan.planner.search_space import (
    can_sequence_parallel,
    enumerate_meshes,
    micro_batch_sizes,
    split_layers,
)
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints, split_layer_option
from autoplan.schema.profile import ModelProfile

GB = 1e9
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
class SolveResult:
    best: Solution
    runners_up: list[Rejected]
    stats: dict[str, float | str] = field(default_factory=dict)


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
        self.n = {
            (i, o, c): var(f"n_{i}_{o}_{c.name}", lowBound=0, upBound=N, cat="Integer")
            for i in range(p)
            for o in inst.block_options()
            for c in self.combos
        }
        self.r = {
            (j, o, c): var(f"r_{j}_{o}_{c.name}", cat="Binary")
            for j in inst.split.prefix + inst.split.suffix
            for o in inst.options
            for c in self.combos
        }
        cont = lambda name: var(name, lowBound=0)  # noqa: E731
        self.E = {(i, c): cont(f"E_{i}_{c.name}") for i in range(p) for c in self.combos if c.zero != 3}
        stored = [o for o in inst.block_options() if split_layer_option(o).storage]
        self.z = {
            (i, o, c): var(f"z_{i}_{o}_{c.name}", cat="Binary") for i in range(p) for o in stored for c in self.combos
        }
        self.D = {(i, c): cont(f"D_{i}_{c.name}") for i in range(p) for c in self.combos} if stored else {}
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
        """T_i,c (+ X_i,c with ZeRO-3): rank i's time per micro-batch with its exposed ZeRO-3 traffic,
        a per-layer coefficient (`LayerCost.zero3_exposed_s`: FSDP2 overlaps layer by layer)."""
        time_s = self.rank_sum(i, c, "time_s")
        return time_s + self.rank_sum(i, c, "zero3_exposed_s") if c.zero == 3 else time_s

    def add_assignment_constraints(self) -> None:
        """sum_c u_c = 1;  sum_{i,o} n[i,o,c] = N u_c;  n[i,o,c] <= N u_c;
        sum_o r[j,o,c] = u_c;  sum_o n[i,o,c] >= v_c u_c (a block per virtual stage)."""
        inst, prob, N = self.inst, self.problem, len(self.inst.split.blocks)
        prob += pulp.lpSum(self.u.values()) == 1, "one_configuration"
        for c in self.combos:
            prob += (
                pulp.lpSum(self.n[i, o, c] for i in range(inst.pp) for o in inst.block_options()) == N * self.u[c],
                f"blocks_all_placed_{c.name}",
            )
            for i in range(inst.pp):
                prob += (
                    pulp.lpSum(self.n[i, o, c] for o in inst.block_options()) >= c.v * self.u[c],
                    f"blocks_per_virtual_stage_{i}_{c.name}",
                )
                for o in inst.block_options():
                    prob += self.n[i, o, c] <= N * self.u[c], f"counts_vanish_{i}_{o}_{c.name}"
            for j in inst.split.prefix + inst.split.suffix:
                prob += pulp.lpSum(self.r[j, o, c] for o in inst.options) == self.u[c], f"recompute_once_{j}_{c.name}"

    def add_time_constraints(self) -> None:
        """Tmax_c >= T_i,c + X_i,c for every rank i."""
        for c in self.combos:
            for i in range(self.inst.pp):
                self.problem += self.Tmax[c] >= self.busy(i, c), f"slowest_rank_{i}_{c.name}"

    def pipeline_expression(self) -> pulp.LpAffineExpression:
        """sum_c P_c + (outright_c p2p_c + step collectives_c) u_c, with B_c = sum_i (T_i,c + X_i,c) and
        P_c >= ((m - 1/v_c) Tmax_c + B_c / v_c) / r + ramp_c p2p_c u_c,  P_c >= m B_c / p
        (r = costmodels.pipeline.bubble_speedup and the send counts costmodels.pipeline.pipeline_sends;
        on GPUs r = 1, ramp = 0 and the first bound always binds; the second only where ranks share cores)."""
        inst = self.inst
        m, p = inst.base.num_micro_batches, inst.pp
        speedup = bubble_speedup(inst.cluster.device)
        shared = inst.cluster.device.shared_core_slowdown > 1
        terms = []
        for c in self.combos:
            config = inst.config((c.schedule, c.v), c.zero, c.sp)
            p2p = p2p_time_s(inst.profile, inst.cluster, config)
            ramp, outright = pipeline_sends(config, shared)
            # the per-step collectives depend on the ZeRO stage (DDP's first bucket): per combination
            comm = outright * p2p + step_collectives_s(inst.profile, inst.cluster, config)
            busy = pulp.lpSum(self.busy(i, c) for i in range(p))
            self.problem += (
                self.P[c] >= ((m - 1 / c.v) * self.Tmax[c] + (1 / c.v) * busy) * (1 / speedup) + ramp * p2p * self.u[c],
                f"pipeline_critical_path_{c.name}",
            )
            if shared:
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
                    self.problem += (
                        self.E[i, c] >= sync - self.rank_sum(i, c, "backward_s"),
                        f"dp_sync_exposed_{i}_{c.name}",
                    )
                    total.append((1 - penalty) * self.E[i, c] + penalty * sync)
            self.problem += self.W >= pulp.lpSum(total), f"sync_and_optimizer_{i}"

    def add_memory_constraints(self) -> None:
        """states_z params_i,c + inflight_c(i) act_i,c + (fixed_i,c + gathered_z) u_c <= cap u_c  (GB)."""
        inst, base = self.inst, self.inst.base
        terms = model_state_bytes_per_param(base.param_dtype)
        for i in range(inst.pp):
            layers = [inst.profile.layers[j] for j in inst.rank_fixed_layers(i) + [inst.split.blocks[0]]]
            fixed_of = {
                (z, sp): sum(
                    fixed_memory_bytes(
                        inst.profile, inst.cluster, base.replace(sequence_parallel=sp), layers, z
                    ).values()
                )
                for z in inst.zeros
                for sp in inst.sps
            }
            for c in self.combos:
                per_param = sum(
                    v if (c.zero == 0 or (c.zero < 3 and name == "params_bytes")) else v / base.dp
                    for name, v in terms.items()
                )
                fixed = fixed_of[c.zero, c.sp]
                # (1 + reserve)(states + activations + D + fixed - overhead) + overhead <= cap
                reserve = inst.cluster.device.allocator_reserve_fraction
                overhead = inst.cluster.device.framework_overhead_bytes
                room = inst.cap_bytes - overhead
                in_flight = in_flight_micro_batches(c.schedule, i, inst.pp, base.num_micro_batches, c.v)
                self.problem += (
                    (
                        per_param * self.rank_sum(i, c, "local_params", 1 / GB)
                        + in_flight * self.rank_sum(i, c, "activation_bytes", 1 / GB)
                        + self.D.get((i, c), 0.0)
                        <= (room / (1 + reserve) - (fixed - overhead)) / GB * self.u[c]
                    ),
                    f"memory_{i}_{c.name}",
                )

    def add_dequantize_constraints(self) -> None:
        """Blocks storing activations narrower (option o): n[i,o,c] <= N z[i,o,c] and
        D_i,c >= dequantized_o z[i,o,c] (GB): rank i's backward holds one block's dequantized
        copies, the largest of the options it uses (`LayerCost.dequantized_bytes`)."""
        inst, N = self.inst, len(self.inst.split.blocks)
        for (i, o, c), used in self.z.items():
            dequantized = inst.costs[inst.split.blocks[0], o, c.sp].dequantized_bytes / GB
            self.problem += self.n[i, o, c] <= N * used, f"stores_narrower_{i}_{o}_{c.name}"
            self.problem += self.D[i, c] >= dequantized * used, f"dequantized_{i}_{o}_{c.name}"

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
        self.add_dequantize_constraints()
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
            pulp.LpSolutionOptimal,
            pulp.LpSolutionIntegerFeasible,
        )

    def solution(self) -> Solution:
        """Read back the chosen configuration and layer placement, evaluated by the cost model."""
        inst = self.inst
        c = max(self.combos, key=lambda combo: self.u[combo].value() or 0)
        config = inst.config((c.schedule, c.v), c.zero, c.sp)
        counts = [{o: int(round(self.n[i, o, c].value() or 0)) for o in inst.block_options()} for i in range(inst.pp)]
        choice = {
            j: max(inst.options, key=lambda o: self.r[j, o, c].value() or 0)
            for j in inst.split.prefix + inst.split.suffix
        }
        return place_layers(inst, config, counts, choice)


# ----------------------------------------------------------------------- driver
def solve(profile: ModelProfile, cluster: ClusterSpec, constraints: Constraints | None = None) -> SolveResult:
    """The fastest plan that fits, and the runners-up.

    >>> result = solve(profile, ClusterSpec.preset("dgx-a100-80gb", num_nodes=2))   # doctest: +SKIP
    >>> result.best.config.mesh                                                       # doctest: +SKIP
    {'dp': 4, 'pp': 1, 'tp': 4}
    """
    started = time.perf_counter()
    constraints = constraints or Constraints()
    if constraints.sequence_parallel and not can_sequence_parallel(profile):
        blocker = profile.sequence_parallel_blocker or "no tensor-parallel region to split along the sequence"
        raise AutoplanError(f"sequence_parallel=True cannot run on {profile.model_name}: {blocker}")
    measured = any(layer.measured_fwd_s is not None for layer in profile.layers)
    dtypes = param_dtype_options(cluster, constraints, measured)
    precisions = [precision_choices(cluster, constraints, dtype) for dtype in dtypes]
    split = split_layers(profile)
    meshes = enumerate_meshes(profile, cluster, constraints, split.num_cuttable_blocks, split.cut_blocker)
    instances = []
    for mesh in meshes:
        for b in micro_batch_sizes(profile.global_batch_size, mesh[0], constraints.micro_batch_size):
            for precision in precisions:
                inst = build_instance(profile, cluster, split, mesh, b, constraints, precision)
                if inst is not None:
                    instances.append((lower_bound_s(inst), inst))
    if not instances:
        raise AutoplanError(
            f"no (mesh, micro-batch size) divides global batch {profile.global_batch_size} "
            f"over world_size({cluster.world_size}) with the pins {constraints.pinned()}"
        )
    instances.sort(key=lambda pair: pair[0])
    solved: list[Solution] = []
    rejected: list[Rejected] = []
    best: Solution | None = None
    num_milps = time_limited = 0
    for bound, inst in instances:
        if best is not None and bound >= best.estimate.step_time_s:
            rejected.append(
                Rejected(inst.base, None, None, f"lower bound {bound:.3g} s >= best {best.estimate.step_time_s:.3g} s")
            )
            continue
        if math.isinf(bound):
            rejected.append(Rejected(inst.base, None, None, "model states alone exceed the memory cap", instance=inst))
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
                rejected.append(
                    Rejected(
                        inst.base,
                        None,
                        None,
                        f"no placement that fits beats the best {best.estimate.step_time_s:.3g} s",
                    )
                )
            continue
        solution = milp.solution()
        time_limited += not milp.proven
        solved.append(solution)
        if best is None or solution.estimate.step_time_s < best.estimate.step_time_s:
            best = solution
    if best is None:
        raise infeasible_error(profile, cluster, split, instances, constraints)
    stats = {
        "solver": "HiGHS" if highs_available() else "CBC",
        "milps_solved": num_milps,
        "milps_time_limited": time_limited,
        "candidates": len(instances),
        "wall_time_s": time.perf_counter() - started,
    }
    return SolveResult(best, runners_up(best, solved, rejected, constraints, cluster), stats)
