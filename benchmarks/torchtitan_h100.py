"""Predicted vs published throughput and peak memory of torchtitan's Llama 3.1 runs on H100.

    python benchmarks/torchtitan_h100.py                  # the table, the MAE, the skipped rows
    python benchmarks/torchtitan_h100.py --json rows.json # the same rows as JSON

The runs are tests/data/torchtitan_h100.json (52 published torchtitan runs; its
`source_notes` and each row's `source` say where every number comes from;
tests/data/README.md says whence the file). Every row the planner can express is planned
PINNED to its published configuration and evaluated by the cost model (a fully pinned
Constraints is evaluated, not searched); the model is the zoo's `llama3-8b`, `llama3-70b`
or `llama3-405b` traced on meta, whose configurations equal the reference's model_args
(`zoo_name` checks layers, hidden, ffn_hidden, heads, kv_heads and vocab).

Cluster (`h100_cluster`): `ClusterSpec.preset("dgx-h100", num_nodes=gpus // 8)` with the
overrides the reference's `hardware_H100_grand_teton` note asks for (Meta Grand Teton:
"H100 with 96GB HBM2e, 2.4 TB/s ... default 500W power limit (not 700W TDP)"):
    memory_bytes = 96e9           96 GB HBM2e (the preset's 80 GB HBM3), counted like the
                                  presets: datasheet GB x 1e9
    memory_bandwidth_gbps = 2400  2.4 TB/s HBM2e (the preset's 3,350 GB/s HBM3)
    peak_flops["bfloat16"] = 912e12
                                  NVIDIA publishes no figure for the 500 W part; torchtitan's
                                  footnote puts it "between SXM and NVL", so the midpoint of
                                  the H100 SXM (989.5 TFLOP/s dense BF16, 700 W) and H100 NVL
                                  (835 TFLOP/s, 350-400 W) datasheets. It is uncertain by
                                  +-8%, which moves every predicted throughput with it.
Not overridden, because the reference says the same as the preset: 8 GPUs per host on
fully connected NVLink 4 (450 GB/s one direction), 400 Gb/s RDMA per GPU (50 GB/s one
direction, DGX H100's ConnectX-7 NDR), the preset's latencies and its 2 GiB framework
overhead.

Pins per row (`row_constraints`): dp (FSDP2 = ZeRO-3, `data_parallel_shard_degree`), tp
with sequence parallelism (torchtitan's TP plan shards the norms: SequenceParallel), pp
and its schedule (1F1B when pp = 1), micro-batch = the local batch (these torchtitan
versions run no gradient accumulation), recompute ("full"; torchtitan's per-op selective
AC maps to "selective": autoplan's selective keeps every matmul output, torchtitan's op
policy keeps every other matmul and the SDPA output), bfloat16 parameters with float32
gradient reduction (FSDP2 MixedPrecisionPolicy, torchtitan's default
mixed_precision_reduce), the full device memory (max_memory_fraction = 1).

Row classes: "eager" rows give the headline MAE. "compile" rows (torch.compile on) are
evaluated and printed with an MAE of their own: the cost model has no compile term, and
the reference's own eager/compiled pairs differ by ~15% throughput and ~5 GiB memory.
Every other row is skipped with its reasons (`skip_reasons`). Published peak memory is
torchtitan's `max_reserved` in GiB; the prediction is converted to GiB.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path

from autoplan import zoo
from autoplan.analysis.profile import profile_model
from autoplan.errors import AutoplanError
from autoplan.planner.planning import plan_from_profile
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.plan import Plan
from autoplan.schema.profile import ModelProfile

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "torchtitan_h100.json"
"""The reference runs, vendored in the repository (tests/data/README.md says whence)."""
GiB = 1024**3
H100_500W_BF16_PEAK_FLOPS = (989.5e12 + 835e12) / 2
"""Midpoint of the H100 SXM and H100 NVL dense BF16 datasheet peaks (module docstring)."""
H100_GRAND_TETON = {"memory_bytes": int(96e9), "memory_bandwidth_gbps": 2400.0}
"""Overrides of the dgx-h100 preset for Meta's Grand Teton H100 (module docstring)."""
DEVICE_NAME = "H100-SXM-96GB-HBM2e-500W"
ZOO_MODELS = ("llama3-8b", "llama3-70b", "llama3-405b")
MODEL_FIELDS = {
    "layers": "num_layers",
    "hidden": "hidden",
    "ffn_hidden": "ffn_hidden",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "vocab": "vocab_size",
}
"""Reference model field -> LlamaConfig field; a row's model is a zoo model when all agree."""
SCHEDULES = {None: "1f1b", "1F1B": "1f1b", "Interleaved 1F1B": "interleaved_1f1b"}
MAE_TARGET = 0.10
"""Issue 14's acceptance: throughput and peak-memory MAE <= 10% on the expressible rows."""


def load_runs(path: Path = REFERENCE) -> list[dict]:
    """The reference's runs, in file order.

    >>> len(load_runs())
    52
    """
    return json.loads(Path(path).read_text())["runs"]


def zoo_name(model: dict) -> str | None:
    """The zoo Llama whose configuration is the reference's `model` dict, else None.

    >>> zoo_name({"layers": 32, "hidden": 4096, "ffn_hidden": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256})
    'llama3-8b'
    """
    for name in ZOO_MODELS:
        config = zoo.LLAMA_CONFIGS[name]
        if all(model.get(ours) == getattr(config, theirs) for ours, theirs in MODEL_FIELDS.items()):
            return name
    return None


def recompute_option(text: str | None) -> str | None:
    """autoplan's recompute option for the reference's `recompute` text (None: not stated)."""
    text = (text or "").lower()
    for option in ("full", "selective", "none"):
        if text.startswith(option):
            return option
    return None


def _hardware_reason(row: dict) -> str | None:
    hardware = str(row.get("hardware", ""))
    if "H100" in hardware:
        return None
    kind = next((k for k in ("GB200", "B200", "Blackwell", "H200") if k in hardware), hardware[:20])
    return f"{kind}: this set describes the 96 GB / 500 W H100"


def _precision_reason(precision: str) -> str | None:
    if precision == "bf16":
        return None
    if precision.startswith("bf16"):
        return f"precision not published ({precision!r})"
    return f"{precision.split(' (')[0]} training: this set pins bf16 (float8 pairs: tests/unit/test_float8.py)"


def _mesh_reason(row: dict) -> str | None:
    degrees = [row.get(axis) for axis in ("dp", "tp", "pp", "cp")]
    if not all(isinstance(d, int) for d in [*degrees, row.get("gpus")]):
        return f"mesh not a plain dp/tp/pp (dp={row.get('dp')!r}, gpus={row.get('gpus')!r})"
    dp, tp, pp, cp = degrees
    if cp > 1:
        return f"context parallel (cp={cp}): the planner has no cp axis"
    if dp * tp * pp != row["gpus"]:
        return f"dp({dp}) * tp({tp}) * pp({pp}) != gpus({row['gpus']})"
    return None


def skip_reasons(row: dict) -> list[str]:
    """Why the planner cannot express `row` (empty: it can).

    >>> skip_reasons({"hardware": "H100", "gpus": 8, "dp": 2, "tp": 1, "pp": 1, "cp": 4, "precision": "bf16",
    ...               "model": {"arch": "Qwen3 8B", "seq": 8192}, "compile": True, "recompute": "full",
    ...               "local_batch_size": 1})
    ['context parallel (cp=4): the planner has no cp axis', 'model not in the zoo: Qwen3 8B']
    """
    precision = str(row.get("precision", ""))
    model = row.get("model") or {}
    checks = [
        _hardware_reason(row),
        _mesh_reason(row),
        _precision_reason(precision),
        "async TP: the cost model has no overlapped tensor parallelism" if row.get("async_tp") else None,
        None if zoo_name(model) else f"model not in the zoo: {model.get('arch')}",
        None if isinstance(row.get("compile"), bool) else f"compiled by {row.get('compile')}, not torch.compile",
        None
        if recompute_option(row.get("recompute"))
        else f"activation checkpointing not stated ({row.get('recompute')!r})",
        None if row.get("schedule") in SCHEDULES else f"schedule {row.get('schedule')!r}",
        None if row.get("local_batch_size") else "local batch size not published",
        None if model.get("seq") else "sequence length not published",
    ]
    return [reason for reason in checks if reason]


def row_class(row: dict) -> str:
    """ "skipped", "compile" (evaluated, not in the headline MAE) or "eager"."""
    if skip_reasons(row):
        return "skipped"
    return "compile" if row["compile"] else "eager"


def h100_cluster(gpus: int) -> ClusterSpec:
    """The reference's H100 cluster: `gpus` // 8 Grand Teton hosts (module docstring).

    >>> cluster = h100_cluster(16)
    >>> cluster.world_size, cluster.device.memory_bytes, cluster.device.peak_flops["bfloat16"]
    (16, 96000000000, 912250000000000.0)
    """
    peaks = ClusterSpec.preset("dgx-h100").device.peak_flops
    cluster = ClusterSpec.preset(
        "dgx-h100",
        num_nodes=gpus // 8,
        peak_flops={**peaks, "bfloat16": H100_500W_BF16_PEAK_FLOPS},
        **H100_GRAND_TETON,
    )
    return cluster.model_copy(update={"device": cluster.device.model_copy(update={"name": DEVICE_NAME})})


def row_constraints(row: dict) -> Constraints:
    """The row's published configuration as planner pins (module docstring)."""
    return Constraints(
        dp=row["dp"],
        tp=row["tp"],
        pp=row["pp"],
        schedule=SCHEDULES[row["schedule"]],
        zero_stage=3,
        micro_batch_size=row["local_batch_size"],
        recompute=recompute_option(row["recompute"]),
        sequence_parallel=row["tp"] > 1,
        param_dtype="bfloat16",
        grad_reduce_dtype="float32",
        max_memory_fraction=1.0,
    )


@cache
def sequence_profile(name: str, seq_len: int) -> ModelProfile:
    """The zoo model's per-sequence profile, traced on meta (cached: rows share models)."""
    job = zoo.build(name, batch_size=1, seq_len=seq_len, device="meta")
    return profile_model(job.module, job.example_inputs, model_name=name, loss_fn=job.loss_fn, targets=job.targets)


EVALUATION_MEMORY_BYTES = 10**15
"""The device memory the rows are planned with: the published run fit its 96 GB, so the cost
model's estimate of what it used is wanted, not the planner's verdict (which compares the
estimate's upper bound with the cap and would recompute the output layer, which torchtitan
does not, to stay under it)."""


def row_plan(row: dict) -> Plan:
    """The pinned plan of an expressible row, evaluated without a memory cap
    (`EVALUATION_MEMORY_BYTES`): the layers outside the blocks keep everything, as in torchtitan."""
    profile = sequence_profile(zoo_name(row["model"]), row["model"]["seq"])
    global_batch = row["local_batch_size"] * row["dp"]
    profile = profile.model_copy(update={"global_batch_size": global_batch})
    cluster = h100_cluster(row["gpus"])
    roomy = cluster.device.model_copy(update={"memory_bytes": EVALUATION_MEMORY_BYTES})
    return plan_from_profile(profile, cluster.model_copy(update={"device": roomy}), row_constraints(row))


def relative_error(predicted: float | None, published: float | None) -> float | None:
    return None if predicted is None or not published else predicted / published - 1


def time_terms(breakdown: dict[str, float]) -> dict[str, float]:
    """The predicted step split into seconds of compute, recompute, TP, exposed FSDP, DP sync,
    optimizer, pipeline bubble + sends and per-step collectives (they add up to the step)."""
    parts = ("recompute_s", "tp_comm_s", "zero3_exposed_s", "bubble_s", "p2p_s")
    return {
        "compute_s": breakdown["pipeline_s"] - sum(breakdown[k] for k in parts),
        **{k: breakdown[k] for k in parts},
        "dp_sync_exposed_s": breakdown["dp_sync_exposed_s"],
        "optimizer_s": breakdown["optimizer_s"],
        "step_collectives_s": breakdown["step_collectives_s"],
    }


def evaluate_row(row: dict) -> dict:
    """Published vs predicted tokens/s/GPU and peak GiB of an expressible row, with the plan's
    mesh, its step-time terms and its memory terms."""
    result = {"id": row["id"], "class": row_class(row), "config": config_text(row)}
    result["published_tps"] = row["tokens_per_s_per_gpu"]
    result["published_gib"] = row.get("peak_memory_gib")
    tokens = row["local_batch_size"] * row["dp"] * row["model"]["seq"]
    result["published_step_s"] = tokens / (row["tokens_per_s_per_gpu"] * row["gpus"])
    try:
        plan = row_plan(row)
    except AutoplanError as error:
        return {**result, "refused": " ".join(str(error).split())[:200]}
    predicted = plan.predicted
    result.update(
        mesh=dict(plan.mesh),
        micro_batch_size=plan.micro_batch_size,
        predicted_step_s=predicted.step_time_s,
        predicted_tps=predicted.tokens_per_s / row["gpus"],
        predicted_gib=predicted.peak_memory_bytes / GiB,
        time_terms_s=time_terms(predicted.breakdown),
        memory_terms_gib={k: v / GiB for k, v in predicted.breakdown.items() if k.endswith("_bytes")},
    )
    result["tps_error"] = relative_error(result["predicted_tps"], result["published_tps"])
    result["memory_error"] = relative_error(result["predicted_gib"], result["published_gib"])
    return result


def config_text(row: dict) -> str:
    """e.g. "8b fsdp8 tp1 pp1 b2 s8192 selective"."""
    return (
        f"{zoo_name(row['model']).removeprefix('llama3-')} fsdp{row['dp']} tp{row['tp']} pp{row['pp']} "
        f"b{row['local_batch_size']} s{row['model']['seq']} {recompute_option(row['recompute'])}"
    )


def mean_absolute(values: list[float | None]) -> tuple[float | None, int]:
    """(mean of |v| over the values that exist, how many)."""
    present = [abs(v) for v in values if v is not None]
    return (sum(present) / len(present) if present else None), len(present)


def summary(results: list[dict]) -> dict[str, dict]:
    """Per row class (eager, compile, all): throughput and peak-memory MAE and row counts."""
    groups = {"eager": ["eager"], "compile": ["compile"], "all": ["eager", "compile"]}
    out = {}
    for group, classes in groups.items():
        rows = [r for r in results if r["class"] in classes]
        tps_mae, tps_rows = mean_absolute([r.get("tps_error") for r in rows])
        memory_mae, memory_rows = mean_absolute([r.get("memory_error") for r in rows])
        out[group] = {
            "tps_mae": tps_mae,
            "tps_rows": tps_rows,
            "memory_mae": memory_mae,
            "memory_rows": memory_rows,
            "refused": sum("refused" in r for r in rows),
        }
    return out


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(results: list[dict]):
    from rich.table import Table

    table = Table(title="torchtitan on H100 (96 GB, 500 W), pinned to the published configuration")
    for column in ("row", "class", "config", "plan mesh", "published tok/s/GPU", "predicted", "error"):
        table.add_column(column, justify="left" if column in ("row", "class", "config") else "right", no_wrap=True)
    for column in ("published GiB", "predicted GiB", "error"):
        table.add_column(column, justify="right")
    for r in results:
        mesh = r.get("mesh")
        table.add_row(
            r["id"],
            r["class"],
            r["config"],
            "refused" if mesh is None else f"dp{mesh['dp']} tp{mesh['tp']} pp{mesh['pp']}",
            f"{r['published_tps']:g}",
            _number(r.get("predicted_tps"), ".0f"),
            _percent(r.get("tps_error")),
            _number(r["published_gib"], ".1f"),
            _number(r.get("predicted_gib"), ".1f"),
            _percent(r.get("memory_error")),
        )
    return table


TIME_COLUMNS = {
    "compute_s": "compute",
    "recompute_s": "recompute",
    "tp_comm_s": "TP comm",
    "zero3_exposed_s": "FSDP exposed",
    "optimizer_s": "optimizer",
}
"""Step-time terms the terms table shows, seconds (dp sync is 0 under ZeRO-3; pp = 1 has no bubble)."""
MODEL_STATE_TERMS = ("params_bytes", "grads_bytes", "master_weights_bytes", "optimizer_states_bytes")
MEMORY_COLUMNS = ("states", "activations", "FSDP gathered", "other")


def memory_columns(memory_terms_gib: dict[str, float]) -> dict[str, float]:
    """The peak rank's memory in four sums, GiB: model states, activations, FSDP's gathered
    parameters, the rest (transient, communication buffers, framework overhead, ...)."""
    memory = dict(memory_terms_gib)
    shown = {"states": sum(memory.pop(k) for k in MODEL_STATE_TERMS)}
    shown["activations"] = memory.pop("activations_bytes")
    shown["FSDP gathered"] = memory.pop("zero3_gathered_bytes")
    shown["other"] = sum(memory.values())
    return shown


def terms_table(results: list[dict]):
    """Where each predicted step and peak go, beside the published step time."""
    from rich.table import Table

    table = Table(title="Predicted step-time terms (s) and memory terms (GiB) of Plan.predicted.breakdown")
    table.add_column("row", no_wrap=True)
    for column in ("published step", "predicted step", *TIME_COLUMNS.values(), *MEMORY_COLUMNS):
        table.add_column(column, justify="right")
    for r in results:
        if "refused" in r:
            continue
        table.add_row(
            r["id"],
            f"{r['published_step_s']:.2f}",
            f"{r['predicted_step_s']:.2f}",
            *(f"{r['time_terms_s'][k]:.3f}" for k in TIME_COLUMNS),
            *(f"{v:.1f}" for v in memory_columns(r["memory_terms_gib"]).values()),
        )
    return table


def print_report(results: list[dict], skipped: list[dict], totals: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(results_table(results))
    for group, label in (("eager", "eager rows (headline)"), ("compile", "torch.compile rows"), ("all", "all")):
        t = totals[group]
        console.print(
            f"{label}: throughput MAE {_percent(t['tps_mae']).lstrip('+')} over {t['tps_rows']} rows, "
            f"peak-memory MAE {_percent(t['memory_mae']).lstrip('+')} over {t['memory_rows']} rows"
            + (f", {t['refused']} refused" if t["refused"] else "")
            + f" (issue 14 asks <= {MAE_TARGET:.0%})"
        )
    console.print(terms_table(results))
    table = Table(title=f"Skipped: {len(skipped)} rows the planner cannot express")
    table.add_column("row")
    table.add_column("why")
    for row in skipped:
        table.add_row(row["id"], "; ".join(row["reasons"]))
    console.print(table)
    for r in results:
        if "refused" in r:
            console.print(f"refused {r['id']}: {r['refused']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the evaluated and skipped rows here")
    args = parser.parse_args(argv)
    runs = load_runs()
    results = [evaluate_row(row) for row in runs if row_class(row) != "skipped"]
    skipped = [{"id": row["id"], "reasons": skip_reasons(row)} for row in runs if row_class(row) == "skipped"]
    totals = summary(results)
    print_report(results, skipped, totals)
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "skipped": skipped, "summary": totals}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
