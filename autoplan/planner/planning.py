"""The front door: `plan` a model on a cluster, `explain` a plan.

    >>> import autoplan
    >>> job = autoplan.zoo.build("gpt-tiny", batch_size=8)                              # doctest: +SKIP
    >>> plan = autoplan.plan(job.module, autoplan.ClusterSpec.local(4), (job.example_inputs[0],))  # doctest: +SKIP
    >>> print(autoplan.explain(plan))                                                  # doctest: +SKIP

`parallelize` (running a plan) lives in `autoplan.runtime.parallelize`.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from autoplan.costmodels.pipeline import config_layer_cost
from autoplan.errors import AutoplanError
from autoplan.planner.placement import Solution
from autoplan.planner.search_space import split_layers
from autoplan.planner.solver import SolveResult, default_dtypes, solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints, Recompute
from autoplan.schema.parallel import layout_stages
from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES, Candidate, LayerChoice, Plan, Prediction, StagePlan, TPSite
from autoplan.schema.profile import ModelProfile

if TYPE_CHECKING:
    from rich.table import Table

OBJECTIVES = ("throughput",)
ESTIMATED = "estimated (roofline)"

_profile_file_for_callers: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "autoplan_profile_file", default=None
)


@contextlib.contextmanager
def planning_with_profile(profile_file: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, `plan` calls that give no `profile_file` use this one: how
    `autoplan bench --profile` reaches the plans `autoplan.bench.compare` makes.

    >>> with planning_with_profile("gpt-tiny.cpu.json"):        # doctest: +SKIP
    ...     run_bench("gpt-tiny", ClusterSpec.local(2))
    """
    token = _profile_file_for_callers.set(None if profile_file is None else str(profile_file))
    try:
        yield
    finally:
        _profile_file_for_callers.reset(token)


def plan(
    model,
    cluster: ClusterSpec,
    example_inputs: tuple,
    loss_fn: Callable | None = None,
    constraints: Constraints | None = None,
    objective: str = "throughput",
    model_name: str | None = None,
    *,
    profile_file: str | os.PathLike | None = None,
) -> Plan:
    """Profile `model` on one global batch of `example_inputs` and return the fastest plan
    that fits `cluster` (SPEC.md section 2).

    `profile_file` (written by `autoplan profile`) replaces the roofline time of every layer
    it measured, when it was measured on the cluster's device kind in the plan's dtype;
    `plan.measured_sources` and `explain` say which layers used it.

    >>> cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=16)         # doctest: +SKIP
    >>> plan(model, cluster, example_inputs=(tokens,)).mesh                   # doctest: +SKIP
    {'dp': 16, 'pp': 2, 'tp': 4}
    """
    if objective not in OBJECTIVES:
        raise AutoplanError(f"objective={objective!r} is not supported; use one of {list(OBJECTIVES)}")
    constraints = constraints or Constraints()
    param_dtype, _ = default_dtypes(cluster, constraints)  # rejects a pinned activation_dtype before profiling
    from autoplan.analysis.profile import profile_model
    from autoplan.planner.measured import apply_profile, ranks_per_core
    from autoplan.schema.profile_file import ProfileFile

    profile_file = profile_file or _profile_file_for_callers.get()
    measured = ProfileFile.from_json(profile_file) if profile_file else None  # a bad file fails before profiling
    started = time.perf_counter()
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    profile = profile_model(model, example_inputs, model_name=model_name or type(model).__name__, loss_fn=loss_fn)
    summary = None
    if measured is not None and profile_file:
        profile, summary = apply_profile(
            profile,
            measured,
            cluster.device,
            compute_dtype=param_dtype,
            source=Path(profile_file).name,
            ranks_per_core=ranks_per_core(cluster),
        )
    result = plan_from_profile(profile, cluster, constraints)
    if summary:
        result.measured_sources["profile_file"] = summary
    result.solver["total_wall_time_s"] = time.perf_counter() - started
    return result


def check_plan_matches(plan_: Plan, model, example_inputs: tuple, model_name: str | None = None) -> None:
    """Refuse a plan made for another model (its fingerprint: the layers' signatures and
    every parameter's name and shape) with a ValueError naming both; cheap on meta."""
    from autoplan.analysis.profile import profile_model

    if not plan_.model_fingerprint:
        return
    fingerprint = profile_model(model, example_inputs, model_name=model_name or plan_.model_name).fingerprint
    if fingerprint != plan_.model_fingerprint:
        raise AutoplanError(
            f"plan was made for model {plan_.model_name!r} (model_fingerprint "
            f"{plan_.model_fingerprint}), not this model (fingerprint {fingerprint}): its layers or "
            f"parameter shapes differ; re-plan with `autoplan plan`"
        )


def plan_from_profile(profile: ModelProfile, cluster: ClusterSpec, constraints: Constraints | None = None) -> Plan:
    """Solve for an existing ModelProfile and build the Plan.

    >>> plan_from_profile(profile, ClusterSpec.local(4)).mesh    # doctest: +SKIP
    {'dp': 4, 'pp': 1, 'tp': 1}
    """
    return build_plan(profile, cluster, solve(profile, cluster, constraints))


def stage_layout(profile: ModelProfile, solution: Solution) -> list[list[tuple[int, str]]]:
    """`solution`'s (layer index, recompute option) per stage (`layout_stages`): each rank's
    blocks take its recompute options in order, the prefix and suffix keep theirs."""
    config = solution.config
    split = split_layers(profile)
    fixed = set(split.prefix) | set(split.suffix)
    rank_options = [[option for index, option in entries if index not in fixed] for entries in solution.rank_layers]
    fixed_option = {index: option for entries in solution.rank_layers for index, option in entries if index in fixed}
    options_of_rank = [iter(options) for options in rank_options]
    stages = layout_stages(
        split.blocks, [len(options) for options in rank_options], config.virtual_stages, split.prefix, split.suffix
    )
    return [
        [(j, fixed_option[j] if j in fixed else next(options_of_rank[s % config.pp])) for j in stage]
        for s, stage in enumerate(stages)
    ]


def _plan_stages(
    profile: ModelProfile, cluster: ClusterSpec, best: Solution, sources: list[str]
) -> tuple[list[StagePlan], dict[int, LayerChoice]]:
    """The StagePlans of `best` (each with its summed per-layer cost) and every layer's choice."""
    config, estimate = best.config, best.estimate
    stages = []
    layer_choices = {}
    for index, entries in enumerate(stage_layout(profile, best)):
        stage_time = 0.0
        for layer_index, option in entries:
            layer = profile.layers[layer_index]
            stage_time += config_layer_cost(layer, option, cluster, config).time_s
            layer_choices[layer_index] = LayerChoice(
                name=layer.name, recompute=cast(Recompute, option), stage=index, time_source=sources[layer_index]
            )
        stages.append(
            StagePlan(
                index=index,
                pp_rank=index % config.pp,
                layers=[profile.layers[i].name for i, _ in entries],
                predicted_time_s=stage_time,
                predicted_memory_bytes=estimate.rank_memory_bytes[index % config.pp],
            )
        )
    return stages, layer_choices


def _plan_tp_sites(profile: ModelProfile, tp: int, sequence_parallel: bool) -> tuple[dict[str, TPSite], dict[str, int]]:
    """The tp styles (sequence-parallel ones only when sequence parallelism is on) and
    divided attributes of every layer; both empty without tensor parallelism."""
    tp_styles: dict[str, TPSite] = {}
    tp_divide_attrs: dict[str, int] = {}
    if tp > 1:
        for layer in profile.layers:
            tp_styles.update(
                {
                    path: site
                    for path, site in layer.tp_sites.items()
                    if site.style not in SEQUENCE_PARALLEL_STYLES or sequence_parallel
                }
            )
            tp_divide_attrs.update(layer.tp_divide_attrs)
    return tp_styles, tp_divide_attrs


def _plan_prediction(profile: ModelProfile, cluster: ClusterSpec, best: Solution) -> Prediction:
    """The predicted step time, peak memory, breakdown, tokens/s and MFU of `best`."""
    config, estimate = best.config, best.estimate
    tokens = profile.global_batch_size * profile.seq_len
    peak = cluster.device.peak_flops_for(config.param_dtype)
    step_s = estimate.step_time_s
    return Prediction(
        step_time_s=step_s,
        peak_memory_bytes=estimate.peak_memory_bytes,
        breakdown=dict(estimate.breakdown),
        tokens_per_s=tokens / step_s,
        mfu=profile.model_flops_per_sequence * profile.global_batch_size / (step_s * cluster.world_size * peak),
    )


def _plan_runners_up(result: SolveResult) -> list[Candidate]:
    """The solver's runners-up as Candidates."""
    return [
        Candidate(
            **r.config.parallel_fields(),
            recompute=r.recompute,
            step_time_s=r.step_time_s,
            peak_memory_bytes=r.peak_memory_bytes,
            why=r.why,
        )
        for r in result.runners_up
    ]


def build_plan(profile: ModelProfile, cluster: ClusterSpec, result: SolveResult) -> Plan:
    """The Plan of the solver's best solution (stages, per-layer choices, tp styles, prediction)."""
    best = result.best
    config = best.config
    sources = layer_time_sources(profile, cluster)
    stages, layer_choices = _plan_stages(profile, cluster, best, sources)
    tp_styles, tp_divide_attrs = _plan_tp_sites(profile, config.tp, config.sequence_parallel)
    return Plan(
        model_name=profile.model_name,
        **config.parallel_fields(),
        global_batch_size=profile.global_batch_size,
        activation_dtype=config.param_dtype,
        stages=stages,
        layers=[layer_choices[i] for i in range(len(profile.layers))],
        tp_styles=tp_styles,
        tp_divide_attrs=tp_divide_attrs,
        tied_parameters=profile.tied_parameters,
        predicted=_plan_prediction(profile, cluster, best),
        runners_up=_plan_runners_up(result),
        model_fingerprint=profile.fingerprint,
        cluster_fingerprint=cluster.fingerprint(),
        cluster=cluster,
        measured_sources={"layer_time": _summarize_sources(profile, sources), "memory": "estimated"},
        solver=dict(result.stats),
    )


def layer_time_sources(profile: ModelProfile, cluster: ClusterSpec) -> list[str]:
    """Per layer, where the cost model takes its time from: "measured on <device> (<file>)"
    when the profile carries measurements for the cluster's device (as `estimate_layer_time`
    decides), else "estimated (roofline)"."""
    device_names = (cluster.device.name, cluster.device.kind)
    return [
        f"measured on {layer.measured_source or layer.measured_device}"
        if layer.measured_fwd_s is not None and layer.measured_device in device_names
        else ESTIMATED
        for layer in profile.layers
    ]


def _summarize_sources(profile: ModelProfile, sources: list[str]) -> str:
    """One line: "measured on cpu (p.json) for 6/9 layers (blocks.0 .. lm_head); estimated
    (roofline) for 3/9 layers (tok_emb .. drop)" — runs of consecutive layers folded."""
    if set(sources) == {ESTIMATED}:
        return ESTIMATED
    runs: dict[str, list[list[str]]] = {}
    for index, (layer, source) in enumerate(zip(profile.layers, sources)):
        if index and sources[index - 1] == source:
            runs[source][-1].append(layer.name)
        else:
            runs.setdefault(source, []).append([layer.name])
    return "; ".join(
        f"{source} for {sources.count(source)}/{len(sources)} layers ("
        + ", ".join(run[0] if len(run) == 1 else f"{run[0]} .. {run[-1]}" for run in source_runs)
        + ")"
        for source, source_runs in runs.items()
    )


def _compress_runs(plan: Plan) -> list[tuple[str, str, int, str]]:
    """(first..last layer names, recompute, stage, time source) with runs of equal choices folded."""
    rows: list[list] = []
    for layer in plan.layers:
        source = layer.time_source or "-"
        if rows and rows[-1][1:4] == [layer.recompute, layer.stage, source]:
            rows[-1][4] = layer.name
            rows[-1][5] += 1
        else:
            rows.append([layer.name, layer.recompute, layer.stage, source, layer.name, 1])
    return [
        (f"{first} .. {last} ({count})" if count > 1 else first, recompute, stage, source)
        for first, recompute, stage, source, last, count in rows
    ]


def _stages_table(plan: Plan) -> Table:
    """The "stages" table of `explain`: per stage its rank, layers, time and memory; a run
    of middle stages with as many layers and the same time is one row ("1..14"), its memory
    the range over the pipeline ranks holding them."""
    from rich.table import Table

    capacity = plan.cluster.device.memory_bytes
    stages = Table(title="stages")
    for column in ("stage", "pp rank", "layers", "time / micro-batch", "rank memory", "of capacity"):
        stages.add_column(column)
    groups: list[list[StagePlan]] = []
    for stage in plan.stages:
        middle = 0 < stage.index < len(plan.stages) - 1
        previous = groups[-1][-1] if groups else None
        if (
            previous is not None
            and middle
            and previous.index > 0
            and len(previous.layers) == len(stage.layers)
            and f"{previous.predicted_time_s:.3g}" == f"{stage.predicted_time_s:.3g}"
        ):
            groups[-1].append(stage)
        else:
            groups.append([stage])
    for members in groups:
        first, last = members[0], members[-1]
        if len(members) == 1:
            names = first.layers
            shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} .. {names[-1]} ({len(names)})"
        else:
            shown = f"{len(first.layers)} layers each: {first.layers[0]} .. {last.layers[-1]}"
        ranks = sorted({stage.pp_rank for stage in members})
        low = min(stage.predicted_memory_bytes for stage in members)
        high = max(stage.predicted_memory_bytes for stage in members)
        stages.add_row(
            str(first.index) if len(members) == 1 else f"{first.index}..{last.index}",
            str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}",
            shown,
            f"{first.predicted_time_s * 1e3:.2f} ms",
            f"{high / 1e9:.2f} GB" if low == high else f"{low / 1e9:.2f}-{high / 1e9:.2f} GB",
            f"{high / capacity:.0%}" if low == high else f"{low / capacity:.0%}-{high / capacity:.0%}",
        )
    return stages


def _runners_up_table(plan: Plan) -> Table:
    """The "runners-up" table of `explain`: each losing candidate and why it lost."""
    from rich.table import Table

    runners = Table(title="why this plan: the runners-up and what each loses by")
    for column in ("mesh", "mbs", "schedule", "ZeRO", "recompute", "SP", "step", "memory", "why it lost"):
        runners.add_column(column)
    for c in plan.runners_up:
        runners.add_row(
            f"dp{c.mesh['dp']} pp{c.mesh['pp']} tp{c.mesh['tp']}",
            str(c.micro_batch_size),
            "-" if c.step_time_s is None else c.schedule + (f" v={c.virtual_stages}" if c.virtual_stages > 1 else ""),
            str(c.zero_stage),
            c.recompute,
            str(c.sequence_parallel),
            f"{c.step_time_s:.4g} s" if c.step_time_s else "-",
            f"{c.peak_memory_bytes / 1e9:.1f} GB" if c.peak_memory_bytes else "-",
            c.why,
        )
    return runners


ZERO_NOTES = {
    1: " (FSDP2 keeping parameters gathered: optimizer states and gradients sharded, the memory of ZeRO-2)",
    2: " (FSDP2 keeping parameters gathered: optimizer states and gradients sharded)",
}
"""What ZeRO-1/2 are when they run: FSDP2 reduce-scatters gradients, so both shard them."""


def explain(plan: Plan, all_layers: bool = False) -> str:
    """The full report `autoplan show` prints: the batch and where it came from, the mesh,
    stages (runs of equal stages grouped), per-layer choices folded over repeated blocks
    (`all_layers`: one row per run of layers on a stage), cost sources, the time and memory
    breakdown of the worst rank, why this plan beat the runners-up, the solver's statistics.

    >>> print(explain(Plan.from_json("plan.json")))    # doctest: +SKIP
    """
    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=130, color_system=None)
    predicted, capacity = plan.predicted, plan.cluster.device.memory_bytes
    console.print(f"[bold]{plan.model_name}[/] on {plan.cluster.describe()}")
    console.print(_batch_line(plan))
    console.print(
        f"mesh pp={plan.mesh['pp']} x dp={plan.mesh['dp']} x tp={plan.mesh['tp']}  "
        f"micro-batch {plan.micro_batch_size} x {plan.num_micro_batches} per step  schedule {plan.schedule}"
        f"{f' v={plan.virtual_stages}' if plan.virtual_stages > 1 else ''}  ZeRO-{plan.zero_stage}"
        f"{ZERO_NOTES.get(plan.zero_stage, '')}  "
        f"sequence-parallel {plan.sequence_parallel}  params {plan.param_dtype}, "
        f"grad reduce {plan.grad_reduce_dtype}"
    )
    mfu = f"  MFU {predicted.mfu:.1%}" if predicted.mfu is not None else ""
    tokens = f"  {predicted.tokens_per_s:,.0f} tokens/s" if predicted.tokens_per_s else ""
    console.print(
        f"predicted step {predicted.step_time_s:.4g} s{tokens}{mfu}; peak memory "
        f"{predicted.peak_memory_bytes / 1e9:.2f} GB of {capacity / 1e9:.0f} GB per device"
    )
    console.print(_stages_table(plan))
    console.print(_layers_table(plan, all_layers))
    if plan.measured_sources:
        console.print("cost sources:")
        for name, source in plan.measured_sources.items():
            console.print(f"  {name.replace('_', ' ')}: {source}", soft_wrap=True)
    for table in _breakdown_tables(plan):
        console.print(table)
    if plan.runners_up:
        console.print(_runners_up_table(plan))
    if plan.solver:
        console.print(_solver_line(plan), soft_wrap=True)
    return console.export_text()


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


def _layers_table(plan: Plan, all_layers: bool) -> Table:
    """Per-layer choices: folded over the stages (repeated blocks with the same choices are one
    row, with the stages they span), or with `all_layers` one row per run on a stage."""
    from rich.table import Table

    table = Table(title="per-layer choices" + ("" if all_layers else " (autoplan show --layers: per stage)"))
    for column in ("layers", "recompute", "stage" if all_layers else "stages", "layer time"):
        table.add_column(column)
    if all_layers:
        for run_names, recompute, run_stage, source in _compress_runs(plan):
            table.add_row(run_names, recompute, str(run_stage), source)
        return table
    rows: list[list] = []
    for layer in plan.layers:
        source = layer.time_source or "-"
        if rows and rows[-1][1:3] == [layer.recompute, source]:
            rows[-1][3], rows[-1][4], rows[-1][5] = layer.name, rows[-1][4] + 1, layer.stage
        else:
            rows.append([layer.name, layer.recompute, source, layer.name, 1, layer.stage, layer.stage])
    for first, recompute, source, last, count, last_stage, first_stage in rows:
        names = f"{first} .. {last} ({count})" if count > 1 else first
        stages = str(first_stage) if first_stage == last_stage else f"{first_stage}..{last_stage}"
        table.add_row(names, recompute, stages, source)
    return table


def _breakdown_tables(plan: Plan) -> list[Table]:
    """The worst rank's time terms (ms) and memory terms (GB), as two labelled tables."""
    from rich.table import Table

    time_table = Table(title="time per step, worst rank")
    memory_table = Table(title="memory, worst rank")
    for table, unit in ((time_table, "ms"), (memory_table, "GB")):
        table.add_column("term")
        table.add_column(unit, justify="right")
    for name, value in plan.predicted.breakdown.items():
        if name.endswith("_s"):
            time_table.add_row(name.removesuffix("_s").replace("_", " "), f"{value * 1e3:,.2f}")
        elif name.endswith("_bytes"):
            memory_table.add_row(name.removesuffix("_bytes").replace("_", " "), f"{value / 1e9:,.3f}")
        else:
            time_table.add_row(name.replace("_", " "), f"{value:.4g}")
    return [time_table, memory_table]


def _solver_line(plan: Plan) -> str:
    """The solver's statistics in words; says when a MILP hit its time limit (the plan is
    the best found, not proven optimal)."""
    stats = dict(plan.solver)
    parts = [f"solver {stats.pop('solver', '?')}"]
    if "wall_time_s" in stats:
        parts.append(f"{float(stats.pop('wall_time_s')):.2f} s")
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
