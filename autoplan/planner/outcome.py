"""What a solve reports besides its best plan: the runners-up and why each lost, and, when no
plan fits, the error naming the smallest memory per device any plan would need. Memory is
judged by its upper bound, the predicted peak x (1 + the device kind's memory margin,
`autoplan.costmodels.uncertainty`), as the MILP's cap is.

    >>> result = solve(profile, cluster)                         # doctest: +SKIP
    >>> [r.why for r in result.runners_up]                       # doctest: +SKIP
    ['slower by 3.1%', 'needs 93.2 GB (+42%) > 72.0 GB']
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.costmodels import uncertainty
from autoplan.errors import InfeasibleError
from autoplan.planner.instance import Instance
from autoplan.planner.placement import Solution, smallest_memory_plan
from autoplan.planner.search_space import LayerSplit
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.profile import ModelProfile

GB = 1e9


@dataclass
class Rejected:
    """A (mesh, micro-batch) pair that lost, and why."""

    config: ParallelConfig
    step_time_s: float | None
    peak_memory_bytes: float | None
    why: str
    recompute: str = "-"
    instance: Instance | None = None
    """Set when memory ruled the pair out (to say how much it would need)."""


def summary_recompute(solution: Solution) -> str:
    options = sorted({option for entries in solution.rank_layers for _, option in entries})
    return options[0] if len(options) == 1 else "mixed(" + ",".join(options) + ")"


def runners_up(
    best: Solution,
    solved: list[Solution],
    rejected: list[Rejected],
    constraints: Constraints,
    cluster: ClusterSpec,
    limit: int = 5,
) -> list[Rejected]:
    """The next fastest distinct configurations, then the memory-infeasible ones."""
    cap, kind = constraints.max_memory_fraction * cluster.device.memory_bytes, cluster.device.kind
    out, seen = [], {(best.config.mesh["dp"], best.config.mesh["pp"], best.config.micro_batch_size)}
    for solution in sorted(solved, key=lambda s: s.estimate.step_time_s):
        key = (solution.config.mesh["dp"], solution.config.mesh["pp"], solution.config.micro_batch_size)
        if solution is best or key in seen:
            continue
        seen.add(key)
        slower = solution.estimate.step_time_s / best.estimate.step_time_s - 1
        out.append(
            Rejected(
                solution.config,
                solution.estimate.step_time_s,
                solution.estimate.peak_memory_bytes,
                f"slower by {slower:.1%}",
                summary_recompute(solution),
            )
        )
    for item in rejected:
        if item.instance is not None and len(out) < limit:
            need = smallest_memory_plan(item.instance).estimate.peak_memory_bytes
            upper = uncertainty.peak_memory_upper_bytes(need, kind)
            if upper > cap:
                item.why = f"needs {upper / GB:.1f} GB (+{uncertainty.memory_margin(kind):.0%}) > {cap / GB:.1f} GB"
            item.peak_memory_bytes = need
            out.append(item)
    pruned = []  # one per (dp, pp, micro-batch) not shown yet: the other parameter dtype's is no news
    for item in rejected:
        key = (item.config.mesh["dp"], item.config.mesh["pp"], item.config.micro_batch_size)
        if item.why.startswith("lower bound") and key not in seen:
            seen.add(key)
            pruned.append(item)
    return (out + pruned)[:limit]


def infeasible_error(
    profile: ModelProfile, cluster: ClusterSpec, split: LayerSplit, instances, constraints: Constraints
) -> InfeasibleError:
    """No plan's memory upper bound fits the cap: the smallest plan's bound, its arithmetic (the
    point estimate times 1 + the device kind's memory margin, against max_memory_fraction x the
    device's memory), what its worst rank holds, and the device memory that would fit it."""
    smallest = min((smallest_memory_plan(inst) for _, inst in instances), key=lambda s: s.estimate.peak_memory_bytes)
    est, kind, fraction = smallest.estimate, cluster.device.kind, constraints.max_memory_fraction
    cap, margin = fraction * cluster.device.memory_bytes, uncertainty.memory_margin(kind)
    upper = uncertainty.peak_memory_upper_bytes(est.peak_memory_bytes, kind)
    rank = max(range(len(est.rank_memory)), key=lambda i: est.rank_memory_bytes[i])
    terms = ", ".join(f"{k.removesuffix('_bytes')} {v / GB:.2f} GB" for k, v in est.rank_memory[rank].items() if v)
    c, memory_bytes = smallest.config, cluster.device.memory_bytes
    fix = f"it fits devices of memory_bytes >= {upper / fraction / GB:.2f} GB" + (
        f", or max_memory_fraction >= {upper / memory_bytes:.3f}" if upper <= memory_bytes else ""
    )
    return InfeasibleError(
        f"no plan fits in memory: the smallest plan needs {upper / GB:.2f} GB per device > "
        f"{cap / GB:.2f} GB (max_memory_fraction {fraction} x {memory_bytes / GB:.0f} GB): its "
        f"predicted peak {est.peak_memory_bytes / GB:.2f} GB x (1 + memory margin {margin:.1%} from the {kind} "
        f"calibration residuals, autoplan.costmodels.uncertainty); that plan is dp={c.dp} pp={c.pp} tp={c.tp} "
        f"micro_batch_size={c.micro_batch_size} ZeRO-{c.zero_stage} recompute=full; its worst rank holds {terms}; {fix}"
    )
