"""The bench's candidates planned once and priced under other cluster specs: planning only,
nothing runs. What `benchmarks/calibration_repeat.py` (two calibrations of one machine) and
its constant-by-constant ablation compare.

    >>> plans = plan_candidates("gpt-small-demo", ClusterSpec.local(4), global_batch_size=8)  # doctest: +SKIP
    >>> {name: step_s(plans, name, ClusterSpec.local(4)) for name in plans.solutions}          # doctest: +SKIP

A candidate is planned on one cluster spec (the planner's choice and the baselines of
`autoplan.bench.compare`, or the exact configurations a bench report measured); pricing it
under another spec keeps its plan (mesh, micro-batch, schedule, layers per stage and their
recompute) and re-evaluates the cost model (`costmodels.pipeline.estimate_step`), so a
difference between two specs is the constants' alone, not a different choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from autoplan.bench.compare import DEFAULT_GLOBAL_BATCH_SIZE, _named_candidates
from autoplan.errors import InfeasibleError
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints, split_layer_option
from autoplan.schema.profile import ModelProfile

PINNED_PLAN_FIELDS = (
    "micro_batch_size",
    "schedule",
    "virtual_stages",
    "zero_stage",
    "sequence_parallel",
    "param_dtype",
    "grad_reduce_dtype",
)
"""The fields of a bench report's `plan` that pin a measured candidate's configuration again."""


@dataclass
class CandidatePlans:
    """The profile of one model and each candidate's solution (or why it has none)."""

    model: str
    profile: ModelProfile
    solutions: dict = field(default_factory=dict)
    """name -> `autoplan.planner.placement.Solution`"""
    failed: dict[str, str] = field(default_factory=dict)
    """name -> why planning it failed"""


def model_profile(model_name: str, cluster: ClusterSpec, global_batch_size: int, profile_file: str | None):
    """The planner's profile of a zoo model (with `profile_file`'s measured layer times applied,
    as `autoplan.planner.planning.plan` does)."""
    from autoplan.analysis.profile import profile_model
    from autoplan.planner.measured import apply_profile, profile_stretch
    from autoplan.planner.precision import precision_choices
    from autoplan.schema.profile_file import ProfileFile
    from autoplan.zoo import build

    job = build(model_name, batch_size=global_batch_size, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name=model_name, loss_fn=job.loss_fn)
    if profile_file:
        measured = ProfileFile.from_json(profile_file)
        profile, _ = apply_profile(
            profile,
            measured,
            cluster.device,
            compute_dtype=precision_choices(cluster, Constraints()).param_dtype,
            source=Path(profile_file).name,
            stretch=profile_stretch(measured, cluster),
        )
    return profile


def plan_candidates(
    model_name: str,
    cluster: ClusterSpec,
    global_batch_size: int = DEFAULT_GLOBAL_BATCH_SIZE,
    profile_file: str | None = None,
    pinned: dict[str, Constraints] | None = None,
) -> CandidatePlans:
    """Solve each candidate on `cluster`: the bench's (the planner's choice and the baselines),
    or the `pinned` constraints given (`measured_constraints` of a bench report)."""
    from autoplan.planner.solver import solve

    profile = model_profile(model_name, cluster, global_batch_size, profile_file)
    named = list(pinned.items()) if pinned is not None else _named_candidates(cluster, (), True)
    plans = CandidatePlans(model=model_name, profile=profile)
    for name, constraints in named:
        try:
            plans.solutions[name] = solve(profile, cluster, constraints).best
        except (InfeasibleError, ValueError) as error:
            plans.failed[name] = " ".join(str(error).split())[:200]
    return plans


def step_s(plans: CandidatePlans, name: str, cluster: ClusterSpec) -> float:
    """The predicted step seconds of candidate `name`'s plan under `cluster`'s constants."""
    from autoplan.costmodels.pipeline import estimate_step

    solution = plans.solutions[name]
    return estimate_step(plans.profile, cluster, solution.config, solution.rank_layers).step_time_s


def measured_constraints(report: dict) -> dict[str, Constraints]:
    """Each measured candidate of a bench report pinned to the configuration that ran (mesh and
    the plan fields of PINNED_PLAN_FIELDS, recompute when one option held every layer)."""
    pinned = {}
    for entry in report["candidates"]:
        if not entry.get("measured_step_s") or not entry.get("plan"):
            continue
        plan, mesh = entry["plan"], entry["mesh"]
        fields = {key: plan[key] for key in PINNED_PLAN_FIELDS if key in plan}
        if len(plan.get("recompute", [])) == 1 and plan["recompute"][0] in ("none", "selective", "full"):
            fields["recompute"] = plan["recompute"][0]
        pinned[entry["name"]] = Constraints(dp=mesh["dp"], tp=mesh["tp"], pp=mesh["pp"], **fields)
    return pinned


def measured_step_s(report: dict) -> dict[str, float]:
    """name -> measured median step seconds of every candidate of a bench report that ran."""
    return {c["name"]: c["measured_step_s"] for c in report["candidates"] if c.get("measured_step_s")}


def config_key(mesh: dict, fields: dict, recompute) -> str:
    """One string per configuration: mesh, PINNED_PLAN_FIELDS and the recompute options used."""
    return json.dumps(
        [mesh["dp"], mesh["pp"], mesh["tp"], *(fields.get(key) for key in PINNED_PLAN_FIELDS), sorted(set(recompute))]
    )


def solution_key(solution) -> str:
    """`config_key` of a planned Solution."""
    config = solution.config
    options = [split_layer_option(option)[0] for rank in solution.rank_layers for _, option in rank]
    return config_key(config.mesh, config.model_dump(), options)


def entry_key(entry: dict) -> str:
    """`config_key` of a bench report's candidate entry (None-safe: an unplanned entry has none)."""
    return config_key(entry["mesh"], entry["plan"], entry["plan"]["recompute"])


def pinned_constraints(solution) -> Constraints:
    """Constraints that pin a planned Solution's configuration (recompute when uniform)."""
    config = solution.config
    options = {split_layer_option(option)[0] for rank in solution.rank_layers for _, option in rank}
    fields = {key: getattr(config, key) for key in PINNED_PLAN_FIELDS}
    if len(options) == 1 and next(iter(options)) in ("none", "selective", "full"):
        fields["recompute"] = next(iter(options))
    return Constraints(dp=config.dp, tp=config.tp, pp=config.pp, **fields)
