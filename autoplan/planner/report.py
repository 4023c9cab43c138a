"""The report `autoplan show` prints: one set of lines and tables (`report`), rendered for a
100-column screen (`explain`) or written as JSON (`autoplan show --json`).

    >>> print(explain(Plan.from_json("plan.json")))    # doctest: +SKIP
    >>> report(Plan.from_json("plan.json"))["tables"][0]["title"]    # doctest: +SKIP
    'stages'

The batch and where it came from, the mesh, the prediction with the interval the calibration
residuals put around its step time and the upper bound on its peak memory (`interval` in the
JSON: the numbers), the stages (runs of equal stages grouped), the per-layer choices folded over
repeated blocks (`all_layers`: one row per run of layers on a stage), the cost sources, the worst
rank's time and memory, why this plan beat the runners-up, and the solver's statistics in words.
"""

from __future__ import annotations

import io
from typing import Any

from autoplan.schema.plan import Plan, Prediction, StagePlan

WIDTH = 100
"""Columns `explain` renders for: a real plan's report fits one 100 x 60 screen."""

ZERO_NOTES = {
    1: " (FSDP2 keeping parameters gathered: optimizer states and gradients sharded, the memory of ZeRO-2)",
    2: " (FSDP2 keeping parameters gathered: optimizer states and gradients sharded)",
}
"""What ZeRO-1/2 are when they run: FSDP2 reduce-scatters gradients, so both shard them."""


def _table(title: str, columns: list[str], rows: list[list[str]]) -> dict[str, Any]:
    return {"title": title, "columns": columns, "rows": rows}


def report(plan: Plan, all_layers: bool = False) -> dict[str, Any]:
    """The report as data: header lines, titled tables of strings, cost sources, the interval's
    numbers, solver line."""
    predicted, capacity = plan.predicted, plan.cluster.device.memory_bytes
    mfu = f"  MFU {predicted.mfu:.1%}" if predicted.mfu is not None else ""
    tokens = f"  {predicted.tokens_per_s:,.0f} tokens/s" if predicted.tokens_per_s else ""
    lines = [
        f"{plan.model_name} on {plan.cluster.describe()}",
        _batch_line(plan),
        f"mesh pp={plan.mesh['pp']} x dp={plan.mesh['dp']} x tp={plan.mesh['tp']}  "
        f"micro-batch {plan.micro_batch_size} x {plan.num_micro_batches} per step  schedule {plan.schedule}"
        f"{f' v={plan.virtual_stages}' if plan.virtual_stages > 1 else ''}  ZeRO-{plan.zero_stage}"
        f"{ZERO_NOTES.get(plan.zero_stage, '')}  sequence-parallel {plan.sequence_parallel}  "
        f"params {plan.param_dtype}, grad reduce {plan.grad_reduce_dtype}",
        f"predicted step {predicted.step_time_s:.4g} s{tokens}{mfu}; peak memory "
        f"{predicted.peak_memory_bytes / 1e9:.2f} GB of {capacity / 1e9:.0f} GB per device",
        *_interval_lines(predicted),
    ]
    time_rows, memory_rows = _breakdown_rows(plan)
    tables = [
        _table("stages", ["stage", "pp rank", "layers", "time/µbatch", "memory", "of device"], _stage_rows(plan)),
        _table(
            "per-layer choices" + ("" if all_layers else " (autoplan show --layers: per stage)"),
            ["layers", "recompute", "stage" if all_layers else "stages", "layer time"],
            _layer_rows(plan, all_layers),
        ),
        _table("time per step, worst rank", ["term", "ms"], time_rows),
        _table("memory, worst rank", ["term", "GB"], memory_rows),
    ]
    precision_rows = _precision_rows(plan)
    if precision_rows:
        tables.append(
            _table(
                "precision: layers computing or storing narrower, what each run saves per micro-batch",
                ["layers", "activations in", "matmuls in", "memory saved", "time saved"],
                precision_rows,
            )
        )
    if plan.runners_up:
        tables.append(
            _table(
                "why this plan: the runners-up and what each loses by",
                ["mesh", "mbs ZeRO SP", "schedule", "recompute", "step", "memory", "why it lost"],
                _runner_rows(plan),
            )
        )
    return {
        "lines": lines,
        "tables": tables,
        "cost_sources": dict(plan.measured_sources),
        "interval": {
            "step_time_interval_s": predicted.step_time_interval_s,
            "peak_memory_upper_bytes": predicted.peak_memory_upper_bytes,
            "source": predicted.uncertainty_source,
        }
        if predicted.step_time_interval_s is not None
        else None,
        "solver": _solver_line(plan) if plan.solver else "",
    }


def explain(plan: Plan, all_layers: bool = False, width: int = WIDTH) -> str:
    """`report` rendered as text for a `width`-column screen; the time and memory tables side by side."""
    from rich.console import Console
    from rich.table import Table

    data = report(plan, all_layers)
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)

    def rich_table(table: dict[str, Any]) -> Table:
        shown = Table(title=table["title"])
        for column in table["columns"]:
            shown.add_column(column, justify="right" if column in ("ms", "GB") else "left")
        for row in table["rows"]:
            shown.add_row(*row)
        return shown

    for line in data["lines"]:
        console.print(line, highlight=False)
    stages, layers, time_table, memory_table, *others = data["tables"]
    console.print(rich_table(stages))
    console.print(rich_table(layers))
    if data["cost_sources"]:
        sources = [f"{name.replace('_', ' ')} {source}" for name, source in data["cost_sources"].items()]
        console.print("cost sources: " + "; ".join(sources), highlight=False)
    side_by_side = Table.grid(padding=(0, 2))
    side_by_side.add_row(rich_table(time_table), rich_table(memory_table))
    console.print(side_by_side)
    for table in others:
        console.print(rich_table(table))
    if data["solver"]:
        console.print(data["solver"])
    return console.export_text()


def _interval_lines(predicted: Prediction) -> list[str]:
    """The step-time interval and the memory upper bound, one line (none in older plans); which
    rows the residuals come from is the JSON's `interval.source`."""
    if predicted.step_time_interval_s is None or predicted.peak_memory_upper_bytes is None:
        return []
    low, high = predicted.step_time_interval_s
    upper = predicted.peak_memory_upper_bytes
    margin = upper / predicted.peak_memory_bytes - 1 if predicted.peak_memory_bytes else 0.0
    kind = predicted.uncertainty_source.split(":")[0]
    return [
        f"interval ({kind} calibration residuals): step {low:.4g}-{high:.4g} s, "
        f"peak memory at most {upper / 1e9:.2f} GB (+{margin:.0%})"
    ]


def _batch_line(plan: Plan) -> str:
    """Global batch, sequence length and tokens per step, with where each came from."""
    sources = plan.input_sources
    line = f"global batch {plan.global_batch_size} sequences" + (
        f" ({sources['global_batch_size']})" if "global_batch_size" in sources else ""
    )
    if plan.seq_len:
        line += f" x {plan.seq_len} tokens" + (f" ({sources['seq_len']})" if "seq_len" in sources else "")
        line += f" = {plan.global_batch_size * plan.seq_len:,} tokens per step"
    return line


def _stage_groups(plan: Plan) -> list[list[StagePlan]]:
    """Runs of middle stages with as many layers, each one group (its rows give the range of
    times and memory); the first and last stage, which hold the embeddings and the head, stand alone."""
    groups: list[list[StagePlan]] = []
    for stage in plan.stages:
        middle = 0 < stage.index < len(plan.stages) - 1
        first = groups[-1][0] if groups else None
        if first is not None and middle and first.index > 0 and len(first.layers) == len(stage.layers):
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def _span(low: float, high: float, unit: str, digits: str) -> str:
    """ "1.00 GB", or "0.90-1.00 GB" when the group's values differ ("%" follows the number)."""
    shown = f"{low:{digits}}" if f"{low:{digits}}" == f"{high:{digits}}" else f"{low:{digits}}-{high:{digits}}"
    return shown + (unit if unit == "%" else f" {unit}")


def _stage_rows(plan: Plan) -> list[list[str]]:
    """Per stage group: stages, pipeline ranks, layers, time and memory (ranges over the group)."""
    capacity = plan.cluster.device.memory_bytes
    rows = []
    for members in _stage_groups(plan):
        first, last = members[0], members[-1]
        if len(members) == 1:
            names = first.layers
            shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]} ({len(names)})"
        else:
            shown = f"{first.layers[0]} .. {last.layers[-1]} ({len(first.layers)} each)"
        ranks = sorted({stage.pp_rank for stage in members})
        times = [stage.predicted_time_s * 1e3 for stage in members]
        memory = [stage.predicted_memory_bytes for stage in members]
        rows.append(
            [
                str(first.index) if len(members) == 1 else f"{first.index}..{last.index}",
                str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}",
                shown,
                _span(min(times), max(times), "ms", ".1f"),
                _span(min(memory) / 1e9, max(memory) / 1e9, "GB", ".1f"),
                _span(100 * min(memory) / capacity, 100 * max(memory) / capacity, "%", ".0f"),
            ]
        )
    return rows


def _layer_rows(plan: Plan, all_layers: bool) -> list[list[str]]:
    """Runs of layers with equal choices: across stages (with the stages they span), or with
    `all_layers` one run per stage."""
    runs: list[list] = []  # first, last, count, recompute, source, first stage, last stage
    for layer in plan.layers:
        source = layer.time_source or "-"
        previous = runs[-1] if runs else None
        if previous and previous[3:5] == [layer.recompute, source] and (not all_layers or previous[6] == layer.stage):
            previous[1], previous[2], previous[6] = layer.name, previous[2] + 1, layer.stage
        else:
            runs.append([layer.name, layer.name, 1, layer.recompute, source, layer.stage, layer.stage])
    folded = not all_layers and len(runs) > MAX_LAYER_RUNS
    if folded:
        runs = _fold_runs(runs)
    return [
        [
            (f"{count} in {first} .. {last}" if folded else f"{first} .. {last} ({count})") if count > 1 else first,
            recompute,
            str(first_stage) if first_stage == last_stage else f"{first_stage}..{last_stage}",
            source,
        ]
        for first, last, count, recompute, source, first_stage, last_stage in runs
    ]


MAX_LAYER_RUNS = 8
"""More runs of equal choices than this (the MILP may alternate options to fill memory
exactly) fold into one row per choice: its first and last layer, how many, the stages they span."""


def _fold_runs(runs: list[list]) -> list[list]:
    """One run per (recompute, source): first and last layer with it, the count, the stages.

    >>> _fold_runs([["a", "b", 2, "none", "-", 0, 0], ["c", "c", 1, "full", "-", 1, 1],
    ...             ["d", "e", 2, "none", "-", 1, 2]])
    [['a', 'e', 4, 'none', '-', 0, 2], ['c', 'c', 1, 'full', '-', 1, 1]]
    """
    folded: dict[tuple, list] = {}
    for first, last, count, recompute, source, first_stage, last_stage in runs:
        row = folded.setdefault((recompute, source), [first, last, 0, recompute, source, first_stage, last_stage])
        row[1], row[2], row[6] = last, row[2] + count, last_stage
    return list(folded.values())


def _precision_rows(plan: Plan) -> list[list[str]]:
    """Runs of consecutive layers with the same lossy dtypes: activation storage, matmuls, and
    the activation memory and time they save per micro-batch (negative time: the casts cost)."""
    runs: list[list] = []  # first, last, count, activation dtype, matmul dtype, bytes, seconds
    for layer in plan.layers:
        stored = layer.activation_dtype or plan.activation_dtype
        matmul = layer.matmul_dtype or plan.param_dtype
        if stored == plan.activation_dtype and matmul == plan.param_dtype:
            continue
        previous = runs[-1] if runs else None
        if previous and previous[3:5] == [stored, matmul]:
            previous[1], previous[2] = layer.name, previous[2] + 1
            previous[5] += layer.precision_saved_bytes
            previous[6] += layer.precision_saved_s
        else:
            runs.append(
                [layer.name, layer.name, 1, stored, matmul, layer.precision_saved_bytes, layer.precision_saved_s]
            )
    return [
        [
            f"{first} .. {last} ({count})" if count > 1 else first,
            stored,
            matmul,
            f"{saved_bytes / 1e9:,.3f} GB",
            f"{saved_s * 1e3:+,.2f} ms",
        ]
        for first, last, count, stored, matmul, saved_bytes, saved_s in runs
    ]


def _breakdown_rows(plan: Plan) -> tuple[list[list[str]], list[list[str]]]:
    """The worst rank's time terms (ms) and memory terms (GB); terms that are zero are left out."""
    time_rows, memory_rows = [], []
    for name, value in plan.predicted.breakdown.items():
        if not value:
            continue
        if name.endswith("_s"):
            time_rows.append([name.removesuffix("_s").replace("_", " "), f"{value * 1e3:,.2f}"])
        elif name.endswith("_bytes"):
            memory_rows.append([name.removesuffix("_bytes").replace("_", " "), f"{value / 1e9:,.3f}"])
        else:
            time_rows.append([name.replace("_", " "), f"{value:.4g}"])
    return time_rows, memory_rows


def _runner_rows(plan: Plan) -> list[list[str]]:
    """Each losing candidate, short: "interleaved v4" for interleaved 1F1B, "mixed" recompute."""
    rows = []
    for c in plan.runners_up:
        schedule = "interleaved" if c.schedule == "interleaved_1f1b" else c.schedule
        rows.append(
            [
                f"dp{c.mesh['dp']} pp{c.mesh['pp']} tp{c.mesh['tp']}",
                f"{c.micro_batch_size} Z{c.zero_stage}{' SP' if c.sequence_parallel else ''}",
                "-" if c.step_time_s is None else schedule + (f" v{c.virtual_stages}" if c.virtual_stages > 1 else ""),
                "mixed" if c.recompute.startswith("mixed") else c.recompute,
                f"{c.step_time_s:.4g} s" if c.step_time_s else "-",
                f"{c.peak_memory_bytes / 1e9:.1f} GB" if c.peak_memory_bytes else "-",
                c.why,
            ]
        )
    return rows


def _solver_line(plan: Plan) -> str:
    """The solver's statistics in words; says when a MILP hit its time limit (the plan is
    the best found, not proven optimal)."""
    stats = dict(plan.solver)
    parts = [f"solver {stats.pop('solver', '?')}"]
    if "wall_time_s" in stats:
        parts.append(f"{float(stats.pop('wall_time_s')):.2f} s")
    if "total_wall_time_s" in stats:
        parts.append(f"{float(stats.pop('total_wall_time_s')):.2f} s planning in all")
    for key, label in (("milps_solved", "MILPs solved"), ("candidates", "candidates considered")):
        if key in stats:
            parts.append(f"{float(stats.pop(key)):.0f} {label}")
    limited = float(stats.pop("milps_time_limited", 0) or 0)
    if limited:
        parts.append(
            f"{limited:.0f} MILP(s) stopped at their time limit: the plan is the best found, not proven optimal"
        )
    parts += [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()]
    return "; ".join(parts)
