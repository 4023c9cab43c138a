"""`autoplan bench`: the planner's choice beside the plans a practitioner would try by hand.

    >>> report = run_bench("gpt-small-demo", ClusterSpec.local(world_size=4), steps=5,
    ...                    json_path="bench.json", plot_path="bench.png")     # doctest: +SKIP
    >>> [(c["name"], c["predicted_step_s"], c["measured_step_s"]) for c in report["candidates"]]  # doctest: +SKIP

Candidates (each planned by `autoplan.planner.planning.plan` with its pins; a fully pinned one is
evaluated by the cost model, the free fields are still the planner's, e.g. micro-batch):

    autoplan   nothing pinned: the planner's choice
    ddp        dp = world, tp = pp = 1, ZeRO 0            (PyTorch DDP)
    fsdp       dp = world, tp = pp = 1, ZeRO 3            (FSDP / ZeRO-3)
    megatron   tp = devices per node (local: min(N, 2), as a CPU has no NVLink to
               justify more), pp = nodes, dp = the rest, 1F1B (sequence parallelism
               left to the planner)
    pipeline   pp = world, 1F1B
    fix:...    each `--fix` given

Each is launched for `steps` timed steps (after warm-up) through torch's launcher and
reported with predicted and measured step time, tokens/s, peak memory per rank and MFU.
With `rounds` > 1 every candidate is launched once per round, the rounds interleaved
(candidate 1, 2, ..., then again), and its measured step is the median over all its timed
steps: a shared machine's speed drifts by tens of percent over minutes, and interleaving
spreads that drift over the candidates instead of onto whichever ran in a slow spell.
Candidates whose plans are identical (the planner often picks a baseline's configuration)
are launched once per round and report the same measurements (`pooled_with` names the others).
A candidate that is infeasible, runs out of memory or fails is reported as
"failed: <one line>" and the bench goes on; one that cannot run on this machine (a GPU
cluster without GPUs, several nodes) keeps its prediction and says "not run: <why>".
The JSON layout is SPEC.md's `autoplan bench --json` schema plus the fields below.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from autoplan.bench.figures import plot_bench
from autoplan.errors import InfeasibleError
from autoplan.schema.cluster import ClusterSpec, write_atomically
from autoplan.schema.constraints import Constraints
from autoplan.schema.plan import Plan

DEFAULT_GLOBAL_BATCH_SIZE = 8
LOCAL_MAX_TP = 2


def baseline_constraints(cluster: ClusterSpec) -> dict[str, Constraints]:
    """The hand-tuned configurations of the module docstring, for this cluster.

    >>> megatron = baseline_constraints(ClusterSpec.local(world_size=4))["megatron"]
    >>> megatron.dp, megatron.pp, megatron.tp
    (2, 1, 2)
    """
    world = cluster.world_size
    per_node = cluster.devices_per_node
    tp = min(per_node, LOCAL_MAX_TP) if cluster.device.kind == "cpu" else per_node
    pp = cluster.num_nodes
    plain: dict[str, Any] = {"recompute": "none"}
    return {
        "ddp": Constraints(dp=world, tp=1, pp=1, zero_stage=0, **plain),
        "fsdp": Constraints(dp=world, tp=1, pp=1, zero_stage=3, **plain),
        "megatron": Constraints(tp=tp, pp=pp, dp=world // (tp * pp), zero_stage=0, schedule="1f1b", **plain),
        "pipeline": Constraints(dp=1, tp=1, pp=world, zero_stage=0, schedule="1f1b", **plain),
    }


def run_bench(
    model_name: str,
    cluster: ClusterSpec,
    steps: int = 5,
    fixes: Sequence[Constraints] = (),
    global_batch_size: int | None = None,
    seq_len: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    progress: bool = True,
    *,
    baselines: bool = True,
    launcher_args: Sequence[str] = (),
    timeout_s: float = 600.0,
    rounds: int = 1,
    planner_choice: bool = True,
) -> dict:
    """Plan, launch and measure every candidate; print a table; write JSON and a figure if asked.

    `planner_choice` False leaves out the "autoplan" candidate (only the baselines and fixes run).

    Returns the report: {"model", "cluster", "steps", "global_batch_size", "seq_len",
    "candidates": [...]} (SPEC.md's schema; each candidate also carries "status",
    "plan", the per-rank "measured_peak_memory_bytes_per_rank", tokens/s and MFU).

    >>> run_bench("gpt-tiny", ClusterSpec.local(world_size=2), steps=2)["candidates"][0]["name"]  # doctest: +SKIP
    'autoplan'
    """
    from rich.console import Console

    from autoplan.zoo import build

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    job = build(model_name, batch_size=global_batch_size or DEFAULT_GLOBAL_BATCH_SIZE, seq_len=seq_len, device="meta")
    named = _named_candidates(cluster, fixes, baselines)[0 if planner_choice else 1 :]
    console = Console(quiet=not progress, width=None if sys.stdout.isatty() else 160)  # a log file gets the whole table
    runnable = _why_not_runnable(cluster, launcher_args)
    candidates: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="autoplan-bench-") as scratch:
        for round_index in range(rounds):
            ran: dict[str, dict] = {}  # this round's launches by plan: an identical plan runs once
            for index, (name, constraints) in enumerate(named):
                label = f"round {round_index + 1}/{rounds}, " if rounds > 1 else ""
                with console.status(f"[{label}{index + 1}/{len(named)}] {name}: planning and running {steps} step(s)"):
                    entry = _run_candidate(
                        name,
                        constraints,
                        job,
                        model_name,
                        cluster,
                        steps,
                        seq_len,
                        Path(scratch) / f"{index}-plan.json",
                        runnable,
                        launcher_args,
                        timeout_s,
                        ran,
                    )
                if round_index == 0:
                    candidates.append(entry)
                else:
                    _merge_round(candidates[index], entry)
                console.print(f"  {label}{name}: {entry['status'].split(':')[0]}")
    _pool_identical_plans(candidates)
    report = {
        "model": model_name,
        "cluster": cluster.describe(),
        "cluster_calibrated": cluster.calibrated,
        "steps": steps,
        "rounds": rounds,
        "global_batch_size": job.example_inputs[0].shape[0],
        "seq_len": seq_len,
        "candidates": candidates,
    }
    _print_and_write(report, console, progress, json_path, plot_path)
    return report


def _named_candidates(
    cluster: ClusterSpec, fixes: Sequence[Constraints], baselines: bool
) -> list[tuple[str, Constraints]]:
    """The candidates in bench order: the planner's choice, the baselines (if asked), each fix."""
    named = [("autoplan", Constraints())]
    if baselines:
        named += list(baseline_constraints(cluster).items())
    named += [("fix:" + ",".join(f"{key}={value}" for key, value in fix.pinned().items()), fix) for fix in fixes]
    return named


def _print_and_write(report: dict, console, progress: bool, json_path: str | None, plot_path: str | None) -> None:
    """The table and each candidate's non-ok status (with progress), then the JSON and figure if asked."""
    if progress:
        console.print(bench_table(report))
        for entry in report["candidates"]:
            if entry["status"] != "ok":
                console.print(f"{entry['name']}: {entry['status']}", soft_wrap=True)
    if json_path:
        write_atomically(Path(json_path), json.dumps(report, indent=2) + "\n")
    if plot_path:
        plot_bench(report, plot_path)


def _pool_identical_plans(candidates: list[dict]) -> None:
    """Give candidates with identical plans (mesh and every plan field) the median of all
    their measured steps, and name each other in `pooled_with`."""
    groups: dict[str, list[dict]] = {}
    for entry in candidates:
        if entry["measured_step_times_s"]:
            key = json.dumps([entry["mesh"], entry["plan"]], sort_keys=True)
            groups.setdefault(key, []).append(entry)
    for group in groups.values():
        if len(group) < 2:
            continue
        pooled = [t for entry in group for t in entry["measured_step_times_s"]]
        median_s = statistics.median(pooled)
        for entry in group:
            _set_measured_step(entry, median_s)
            entry["pooled_with"] = [other["name"] for other in group if other is not entry]


def _set_measured_step(entry: dict, median_s: float) -> None:
    """A new measured median step; tokens/s and MFU (both 1 / step time) follow it."""
    scale = entry["measured_step_s"] / median_s
    entry["measured_tokens_per_s"] *= scale
    if entry["measured_mfu"] is not None:
        entry["measured_mfu"] *= scale
    entry["measured_step_s"] = median_s


def _merge_round(entry: dict, again: dict) -> None:
    """Fold a later round's run of a candidate into its entry: all timed steps pooled, the
    median re-taken; the largest peak memory kept; a failure in any round is reported."""
    if again["status"] != "ok" and entry["status"] == "ok":
        entry["status"] = again["status"]
    if not again["measured_step_times_s"]:
        return
    entry["measured_step_times_s"] = (entry["measured_step_times_s"] or []) + again["measured_step_times_s"]
    median_s = statistics.median(entry["measured_step_times_s"])
    if not entry["measured_step_s"]:
        entry.update(
            {
                key: again[key]
                for key in (
                    "measured_step_s",
                    "measured_tokens_per_s",
                    "measured_mfu",
                    "measured_peak_memory_bytes_per_rank",
                )
            }
        )
    _set_measured_step(entry, median_s)
    entry["measured_peak_memory_bytes"] = max(
        entry["measured_peak_memory_bytes"] or 0, again["measured_peak_memory_bytes"] or 0
    )


def _why_not_runnable(cluster: ClusterSpec, launcher_args: Sequence[str]) -> str | None:
    """None when this machine can run the cluster's plans, else why not."""
    import torch

    if cluster.num_nodes > 1 and not launcher_args:
        return f"{cluster.num_nodes} nodes: give the launcher's multi-node flags"
    if cluster.device.kind == "cuda" and torch.cuda.device_count() < cluster.devices_per_node:
        return f"needs {cluster.devices_per_node} CUDA device(s) per node, this machine has {torch.cuda.device_count()}"
    return None


def _run_candidate(
    name: str,
    constraints: Constraints,
    job,
    model_name: str,
    cluster: ClusterSpec,
    steps: int,
    seq_len: int | None,
    plan_path: Path,
    not_runnable: str | None,
    launcher_args: Sequence[str],
    timeout_s: float,
    ran: dict[str, dict] | None = None,
) -> dict:
    """Plan one candidate and (when possible) launch it; failures become its status. A plan
    identical to one in `ran` (plan key -> its entry) is not launched again: it takes that
    run's measurements (the planner often picks a baseline's configuration)."""
    from autoplan.planner.planning import plan as make_plan
    from autoplan.runtime.launch import launch

    entry = _empty_entry(name, constraints)
    try:
        plan = make_plan(
            job.module,
            cluster,
            example_inputs=job.example_inputs,
            loss_fn=job.loss_fn,
            constraints=constraints,
            model_name=model_name,
        )
    except InfeasibleError as error:  # no plan with these pins fits in memory
        entry["status"] = "failed: infeasible: " + _one_line(error)
    except ValueError as error:  # pins the model or cluster cannot take (tp does not divide heads, ...)
        entry["status"] = "failed: invalid: " + _one_line(error)
        return entry
    entry.update(_predicted(plan, job))
    if not_runnable:
        entry["status"] = f"not run: {not_runnable}"
        return entry
    key = json.dumps([entry["mesh"], entry["plan"]], sort_keys=True)
    if ran is not None and key in ran:
        for field in ("status", *(field for field in entry if field.startswith("measured_"))):
            entry[field] = ran[key][field]
        return entry
    plan.to_json(plan_path)
    try:
        result = launch(
            plan_path,
            model_name,
            nproc=plan.world_size // max(cluster.num_nodes, 1),
            steps=steps,
            launcher_args=launcher_args,
            seq_len=seq_len,
            timeout_s=timeout_s,
        )
    except (RuntimeError, ValueError) as error:
        entry["status"] = "failed: " + _one_line(error)
        return entry
    if not result:  # multi-node: the result lives with global rank 0 on another node
        entry["status"] = "ok (result on the node of rank 0)"
        return entry
    measured_s = result["median_step_s"]
    entry.update(
        measured_step_s=measured_s,
        measured_step_times_s=result["step_times_s"],
        measured_peak_memory_bytes=result["max_peak_memory_bytes"],
        measured_peak_memory_bytes_per_rank=result["peak_memory_bytes"],
        measured_tokens_per_s=result["tokens_per_s"],
    )
    if entry["predicted_mfu"] is not None:  # same model FLOPs and peak: MFU scales with 1 / step time
        entry["measured_mfu"] = entry["predicted_mfu"] * plan.predicted.step_time_s / measured_s
    if ran is not None:
        ran[key] = entry
    return entry


def _empty_entry(name: str, constraints: Constraints) -> dict[str, Any]:
    """A candidate's entry of the JSON report before planning: status ok, nothing predicted or measured."""
    return {
        "name": name,
        "chosen": name == "autoplan",
        "status": "ok",
        "mesh": None,
        "constraints": constraints.model_dump(mode="json", exclude_none=True),
        "predicted_step_s": None,
        "measured_step_s": None,
        "measured_step_times_s": None,
        "predicted_peak_memory_bytes": None,
        "measured_peak_memory_bytes": None,
        "measured_peak_memory_bytes_per_rank": None,
        "predicted_tokens_per_s": None,
        "measured_tokens_per_s": None,
        "predicted_mfu": None,
        "measured_mfu": None,
        "plan": None,
    }


def _predicted(plan: Plan, job) -> dict:
    first = job.example_inputs[0]
    tokens_per_step = first.numel() if not first.is_floating_point() else first.shape[0]
    return {
        "mesh": plan.mesh,
        "predicted_step_s": plan.predicted.step_time_s,
        "predicted_peak_memory_bytes": plan.predicted.peak_memory_bytes,
        "predicted_tokens_per_s": plan.predicted.tokens_per_s or tokens_per_step / plan.predicted.step_time_s,
        "predicted_mfu": plan.predicted.mfu,
        "plan": {
            **plan.parallel_config().model_dump(exclude={"mesh"}),
            "recompute": sorted(set(plan.recompute_of().values())),
            "stages": [
                {
                    "index": s.index,
                    "pp_rank": s.pp_rank,
                    "num_layers": len(s.layers),
                    "predicted_time_s": s.predicted_time_s,
                }
                for s in plan.stages
            ],
        },
    }


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def bench_table(report: dict):
    """The rich Table `autoplan bench` prints."""
    from rich.table import Table

    table = Table(
        title=f"{report['model']} on {report['cluster']}, {report['steps']} timed step(s)"
        + (" (calibrated)" if report.get("cluster_calibrated") else "")
    )
    for column in (
        "candidate",
        "mesh dp/pp/tp",
        "mb",
        "zero",
        "pred s",
        "meas s",
        "err",
        "tok/s meas",
        "pred MB",
        "meas MB",
        "MFU meas",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("candidate", "status") else "right")
    for entry in report["candidates"]:
        mesh, plan = entry["mesh"], entry["plan"] or {}
        predicted, measured = entry["predicted_step_s"], entry["measured_step_s"]
        table.add_row(
            ("* " if entry["chosen"] else "") + entry["name"],
            f"{mesh['dp']}/{mesh['pp']}/{mesh['tp']}" if mesh else "-",
            _fmt(plan.get("micro_batch_size"), "{}"),
            _fmt(plan.get("zero_stage"), "{}"),
            _fmt(predicted, "{:.4g}"),
            _fmt(measured, "{:.4g}"),
            _fmt(relative_error(predicted, measured), "{:+.0%}"),
            _fmt(entry["measured_tokens_per_s"], "{:.4g}"),
            _fmt(entry["predicted_peak_memory_bytes"] and entry["predicted_peak_memory_bytes"] / 1e6, "{:.1f}"),
            _fmt(entry["measured_peak_memory_bytes"] and entry["measured_peak_memory_bytes"] / 1e6, "{:.1f}"),
            _fmt(entry["measured_mfu"], "{:.1%}"),
            entry["status"].split(":")[0],
        )
    return table


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, None when either is missing."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def summarize(report: dict) -> dict:
    """The numbers the README quotes from a bench report.

    chosen_step_s / best_step_s: the planner's measured step against the best measured
    candidate (best_name); step_error / memory_error: median over the candidates that ran of
    |predicted - measured| / measured (memory: the worst rank of each).
    """
    ran = [c for c in report["candidates"] if c["measured_step_s"]]
    chosen = next((c for c in ran if c["chosen"]), None)
    best = min(ran, key=lambda c: c["measured_step_s"], default=None)
    # a candidate that ran has its prediction and its measurement: relative_error is a number
    memory = [
        abs(cast(float, relative_error(c["predicted_peak_memory_bytes"], c["measured_peak_memory_bytes"])))
        for c in ran
        if c["measured_peak_memory_bytes"]
    ]
    return {
        "num_ran": len(ran),
        "num_candidates": len(report["candidates"]),
        "chosen_step_s": chosen and chosen["measured_step_s"],
        "best_name": best and best["name"],
        "best_step_s": best and best["measured_step_s"],
        "step_error": statistics.median(
            abs(cast(float, relative_error(c["predicted_step_s"], c["measured_step_s"]))) for c in ran
        )
        if ran
        else None,
        "memory_error": statistics.median(memory) if memory else None,
    }


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
