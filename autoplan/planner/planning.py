"""The front door: `plan` a model on a cluster (`explain` a plan: `autoplan.planner.report`).

    >>> import autoplan
    >>> job = autoplan.zoo.build("gpt-tiny", batch_size=8)                              # doctest: +SKIP
    >>> plan = autoplan.plan(job.module, autoplan.ClusterSpec.local(4), (job.example_inputs[0],))  # doctest: +SKIP
    >>> print(autoplan.explain(plan))                                                  # doctest: +SKIP

`parallelize` (running a plan) lives in `autoplan.runtime.parallelize`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from autoplan.costmodels import uncertainty
from autoplan.costmodels.layer import config_layer_cost
from autoplan.errors import AutoplanError
from autoplan.planner.placement import Solution
from autoplan.planner.precision import precision_choices
from autoplan.planner.report import explain  # noqa: F401  (the facade's autoplan.explain)
from autoplan.planner.search_space import split_layers
from autoplan.planner.solver import SolveResult, solve
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints, Recompute, split_layer_option
from autoplan.schema.parallel import layout_stages
from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES, Candidate, LayerChoice, Plan, Prediction, StagePlan, TPSite
from autoplan.schema.profile import ModelProfile

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
    param_dtype = precision_choices(cluster, constraints).param_dtype  # a dtype that cannot run fails before profiling
    from autoplan.analysis.profile import profile_model
    from autoplan.planner.measured import apply_profile, profile_stretch
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
            stretch=profile_stretch(measured, cluster),
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
            cost = config_layer_cost(layer, option, cluster, config, seq_len=profile.seq_len)
            stage_time += cost.time_s
            recompute, storage, matmul = split_layer_option(option)
            exact = (
                config_layer_cost(layer, recompute, cluster, config, seq_len=profile.seq_len)
                if storage or matmul
                else cost
            )
            layer_choices[layer_index] = LayerChoice(
                name=layer.name,
                recompute=cast(Recompute, recompute),
                activation_dtype=storage or config.param_dtype,
                matmul_dtype=matmul or config.param_dtype,
                precision_saved_bytes=exact.activation_bytes - cost.activation_bytes,
                precision_saved_s=exact.time_s - cost.time_s,
                stage=index,
                time_source=sources[layer_index],
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
    """The predicted step time, peak memory, breakdown, tokens/s and MFU of `best`, with the
    interval and the memory bound the device kind's calibration residuals give."""
    config, estimate = best.config, best.estimate
    tokens = profile.global_batch_size * profile.seq_len
    peak = cluster.device.peak_flops_for(config.param_dtype)
    step_s, kind = estimate.step_time_s, cluster.device.kind
    return Prediction(
        step_time_s=step_s,
        peak_memory_bytes=estimate.peak_memory_bytes,
        breakdown=dict(estimate.breakdown),
        tokens_per_s=tokens / step_s,
        mfu=profile.model_flops_per_sequence * profile.global_batch_size / (step_s * cluster.world_size * peak),
        step_time_interval_s=uncertainty.step_time_interval_s(step_s, kind),
        peak_memory_upper_bytes=uncertainty.peak_memory_upper_bytes(estimate.peak_memory_bytes, kind),
        uncertainty_source=f"{kind}: {uncertainty.residuals_of(kind).source}",
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
