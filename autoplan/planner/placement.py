"""Plans from block counts: `place_layers` turns per-rank block counts and the pinned
layers' recompute choices into a Solution evaluated by the cost model (the MILP's answer,
read back, goes through it too), `heuristic_solution` is the balanced plan that gives the
MILP an incumbent to beat, and `smallest_memory_plan` is what a mesh needs at least (to say
why none fits).
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.costmodels.pipeline import StepEstimate, estimate_step
from autoplan.planner.instance import Combo, Instance
from autoplan.schema.constraints import split_layer_option
from autoplan.schema.parallel import ParallelConfig


@dataclass
class Solution:
    """One fully specified plan and its prediction."""

    config: ParallelConfig
    rank_layers: list[list[tuple[int, str]]]
    """Per pipeline rank: (layer index, recompute option), in model order."""
    estimate: StepEstimate


def place_layers(
    inst: Instance, config: ParallelConfig, counts: list[dict[str, int]], fixed_choice: dict[int, str]
) -> Solution:
    """Blocks in model order, rank by rank (fuller recompute first inside a rank), evaluated."""
    blocks = iter(inst.split.blocks)
    rank_layers = []
    for i, per_option in enumerate(counts):
        entries = [(j, fixed_choice[j]) for j in inst.split.prefix] if i == 0 else []
        for option in sorted(per_option, key=placement_order):
            entries += [(next(blocks), option) for _ in range(per_option[option])]
        if i == inst.pp - 1:
            entries += [(j, fixed_choice[j]) for j in inst.split.suffix]
        rank_layers.append(entries)
    return Solution(config, rank_layers, estimate_step(inst.profile, inst.cluster, config, rank_layers))


def placement_order(option: str) -> tuple[int, str]:
    """Fuller recompute first, then "none", then "none" with activations stored narrower."""
    recompute, storage, _ = split_layer_option(option)
    return ("full", "selective", "none").index(recompute), storage or ""


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
            recompute = split_layer_option(option).recompute
            fixed = {
                j: recompute if recompute in inst.options else inst.options[-1]
                for j in inst.split.prefix + inst.split.suffix
            }
            solution = place_layers(
                inst,
                inst.config((c.schedule, c.v), c.zero, c.sp),
                balanced_counts(len(inst.split.blocks), inst.pp, option),
                fixed,
            )
            if solution.estimate.peak_memory_bytes <= inst.cap_bytes:
                if best is None or solution.estimate.step_time_s < best.estimate.step_time_s:
                    best = solution
                break
    return best


def smallest_memory_plan(inst: Instance) -> Solution:
    """Maximal sharding and recomputation, balanced, on the schedule of the instance's (pinned
    or offered) that holds the least in flight: what the mesh needs at least."""
    option = "full" if "full" in inst.options else inst.options[-1]
    counts = balanced_counts(len(inst.split.blocks), inst.pp, inst.block_option or option)
    fixed = {j: option for j in inst.split.prefix + inst.split.suffix}
    plans = [
        place_layers(inst, inst.config(schedule, max(inst.zeros), inst.sps[-1]), counts, fixed)
        for schedule in inst.schedules
    ]
    return min(plans, key=lambda plan: plan.estimate.peak_memory_bytes)
