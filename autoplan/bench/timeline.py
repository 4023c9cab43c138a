"""The pipeline schedule simulator behind `autoplan bench --plot`'s timeline: which pipeline
rank runs which stage's forward or backward of which micro-batch, when, in one step of a
GPipe, 1F1B or interleaved 1F1B schedule, from the plan's predicted stage times.

Each rank runs its actions in the schedule's order and an action starts when its rank is
free and its input exists, so the figure shows the pipeline bubble the cost model charges
(`costmodels.pipeline.pipeline_time_s`) as gaps between the bars.
"""

from __future__ import annotations


def pipeline_timeline(
    stage_times_s: list[float], pp: int, num_micro_batches: int, schedule: str
) -> list[tuple[int, str, int, int, float, float]]:
    """Simulated (pp_rank, "F"/"B", stage, micro_batch, start_s, end_s) of one step.

    Stage i runs on pipeline rank i % pp. Forward is a third of a stage's forward+backward time, backward two thirds.
    Each rank runs its actions in the schedule's order: GPipe all forwards then all backwards;
    1F1B `pp - rank - 1` warm-up forwards then one forward one backward; interleaved
    1F1B (Megatron's order) `(v - 1) * pp + 2 (pp - rank - 1)` warm-up forwards, chunks
    taken pp micro-batches at a time. An action starts when its rank is free and its
    input exists (the previous stage's forward, the next stage's backward).

    >>> [(a[1], a[2], a[3], a[4]) for a in pipeline_timeline([3.0, 3.0], 2, 2, "gpipe") if a[0] == 1][:2]
    [('F', 1, 0, 1.0), ('F', 1, 1, 2.0)]
    """
    num_stages = len(stage_times_s)
    orders = [_rank_order(rank, pp, num_stages // pp, num_micro_batches, schedule) for rank in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    position = [0] * pp
    actions = []
    while any(position[rank] < len(orders[rank]) for rank in range(pp)):
        progressed = False
        for rank in range(pp):
            if position[rank] == len(orders[rank]):
                continue
            kind, stage, mb = orders[rank][position[rank]]
            needs = [("F", stage - 1, mb)] if kind == "F" and stage > 0 else []
            if kind == "B":
                needs = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < num_stages - 1 else [])
            if not all(need in done for need in needs):
                continue
            start = max([free[rank], *(done[need] for need in needs)])
            end = start + stage_times_s[stage] * (1 / 3 if kind == "F" else 2 / 3)
            done[(kind, stage, mb)] = free[rank] = end
            actions.append((rank, kind, stage, mb, start, end))
            position[rank] += 1
            progressed = True
        assert progressed, "pipeline schedule deadlocked"
    return actions


def _rank_order(rank: int, pp: int, v: int, num_micro_batches: int, schedule: str) -> list[tuple[str, int, int]]:
    """The ("F"/"B", stage, micro_batch) actions of one pipeline rank, in the schedule's order
    (`pipeline_timeline`'s docstring)."""
    chunks = [chunk * pp + rank for chunk in range(v)]
    groups = [list(range(start, min(start + pp, num_micro_batches))) for start in range(0, num_micro_batches, pp)]
    forwards = [("F", stage, mb) for group in groups for stage in chunks for mb in group]
    backwards = [("B", stage, mb) for group in groups for stage in reversed(chunks) for mb in group]
    if schedule == "gpipe":
        warmup = len(forwards)
    elif schedule == "interleaved_1f1b":
        warmup = min(len(forwards), (v - 1) * pp + 2 * (pp - rank - 1))
    else:
        warmup = min(len(forwards), pp - rank - 1)
    order = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards):
        order += [forward, backward]
    return order + backwards[len(forwards) - warmup :]


def plot_timeline(axis, candidate: dict) -> None:
    """Draw the chosen candidate's simulated timeline on a matplotlib axis: F blue, B orange,
    later virtual stages darker."""
    plan = candidate["plan"]
    stage_times = [stage["predicted_time_s"] or 1.0 for stage in plan["stages"]]
    pp = candidate["mesh"]["pp"]
    actions = pipeline_timeline(stage_times, pp, plan["num_micro_batches"], plan["schedule"])
    for rank, kind, stage, mb, start, end in actions:
        axis.barh(
            rank,
            end - start,
            left=start,
            color="tab:blue" if kind == "F" else "tab:orange",
            edgecolor="white",
            alpha=0.6 + 0.4 * (stage // pp) / max(plan["virtual_stages"], 1),
        )
        axis.text((start + end) / 2, rank, f"{kind}{mb}", ha="center", va="center", fontsize=7)
    axis.set_yticks(range(pp), [f"pp rank {rank}" for rank in range(pp)])
    axis.invert_yaxis()
    axis.set_xlabel("predicted time (s)")
    axis.set_title(f"chosen plan: {plan['schedule']}, {plan['num_micro_batches']} micro-batches (F blue, B orange)")
