"""The cost model against one real GPU: per-layer time, then single-device training end to end.

    python benchmarks/gpu_validation.py                         # the visible CUDA device, every size
    python benchmarks/gpu_validation.py --quick --markdown out.md
    python benchmarks/gpu_validation.py --cluster my-gpu.toml   # a GPU no preset describes (calibrated)
    python benchmarks/gpu_validation.py --device cpu --quick    # a smoke run of the same code on this CPU

Part 1, per-layer time. One GPT block and one Llama block (autoplan/zoo) per hidden size,
sequence length and dtype: `estimate_layer_time` (the roofline, micro-batch 1, no tp)
against the median forward + backward seconds `profile_model(measure=True)` times for one
sequence on the device.

Part 2, single device end to end. A small GPT and a small Llama planned for a one-device
cluster with every recompute option pinned (`Constraints(recompute=...)`), run through
`autoplan.parallelize` on a one-process group (NCCL on a GPU, gloo on CPU) and trained
with `autoplan.runtime.timing.measure_training`: the plan's predicted step time and peak memory
against the measured median step and `torch.cuda.max_memory_allocated` (on CPU,
`AllocationTracker`). The prediction's framework-overhead term (CUDA context, allocator
slack) is left out of the comparison: `max_memory_allocated` does not see it.

A row passes when |predicted - measured| / measured <= 10%. The exit status is 0 whether
rows pass or not; every failing row is also printed as one `FAIL` line after the tables.
The cost model's device is the preset matching `torch.cuda.get_device_name` (A100 40/80 GB,
H100 SXM, H200), or `--cluster`. Float32 matmuls run without TF32 (PyTorch's default),
which is what the presets' float32 peaks describe.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from autoplan import ClusterSpec, Constraints
from autoplan.bench.compare import relative_error
from autoplan.costmodels.compute import estimate_layer_time
from autoplan.schema.cluster import write_atomically
from autoplan.schema.constraints import RECOMPUTE_OPTIONS
from autoplan.zoo import GPT, GPTConfig, Job, Llama, LlamaConfig, language_model_loss

THRESHOLD = 0.10
"""The acceptance bound on |predicted - measured| / measured."""
NO_CUDA = "no CUDA device: nothing to validate (run with --device cpu for a smoke run)"


@dataclass(frozen=True)
class Sweep:
    """What one run covers on one kind of device."""

    layer_hidden: tuple[int, ...]
    """Part 1: every hidden size x sequence length x dtype, for a GPT and a Llama block."""
    layer_seq_len: tuple[int, ...]
    layer_dtypes: tuple[str, ...]
    hidden: int
    """Part 2: the models' hidden size, layers, sequence length and global batch, and timed steps."""
    num_layers: int
    seq_len: int
    global_batch_size: int
    steps: int


SWEEPS = {
    # part 2 at h=2048, 8 layers, s=2048, batch 8: at most ~24 GB predicted (Llama, no recompute), fits an A100 40GB
    ("cuda", False): Sweep(
        layer_hidden=(1024, 2048, 4096),
        layer_seq_len=(1024, 2048),
        layer_dtypes=("float32", "bfloat16"),
        hidden=2048,
        num_layers=8,
        seq_len=2048,
        global_batch_size=8,
        steps=5,
    ),
    ("cuda", True): Sweep(
        layer_hidden=(1024, 4096),
        layer_seq_len=(2048,),
        layer_dtypes=("float32", "bfloat16"),
        hidden=2048,
        num_layers=4,
        seq_len=1024,
        global_batch_size=4,
        steps=3,
    ),
    # CPU smoke sizes: seconds on two cores, not a validation (one core cannot fill a GEMM)
    ("cpu", False): Sweep(
        layer_hidden=(128, 256),
        layer_seq_len=(64, 128),
        layer_dtypes=("float32",),
        hidden=128,
        num_layers=4,
        seq_len=64,
        global_batch_size=8,
        steps=3,
    ),
    ("cpu", True): Sweep(
        layer_hidden=(64,),
        layer_seq_len=(32,),
        layer_dtypes=("float32",),
        hidden=64,
        num_layers=2,
        seq_len=32,
        global_batch_size=4,
        steps=2,
    ),
}
LAYER_VOCAB = 1024
"""Part 1 vocabulary: only the blocks are compared, and a block does not depend on it."""
FAMILIES = {"gpt": "blocks.0", "llama": "layers.0"}
"""Model family -> the module path of its first block."""


def build_job(
    family: str,
    *,
    hidden: int,
    num_layers: int,
    seq_len: int,
    vocab_size: int,
    batch_size: int,
    device: str,
    dtype: torch.dtype = torch.float32,
) -> Job:
    """A GPT or Llama of this size with one global batch of tokens, on `device` in `dtype`.

    Head dim 128 as GPT-3 and Llama (at least 4 heads at the CPU smoke sizes); Llama with
    one kv head per 4 q heads (Llama-3) and its SwiGLU width 8h/3 rounded up to 256.

    >>> job = build_job("llama", hidden=4096, num_layers=1, seq_len=8, vocab_size=64, batch_size=1, device="meta")
    >>> job.module.config.num_kv_heads, job.module.config.ffn_hidden
    (8, 11008)
    """
    num_heads = max(4, hidden // 128)
    if family == "gpt":
        config = GPTConfig(
            num_layers=num_layers, num_heads=num_heads, hidden=hidden, vocab_size=vocab_size, seq_len=seq_len
        )
        model_cls = GPT
    else:
        config = LlamaConfig(
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=max(1, num_heads // 4),
            hidden=hidden,
            ffn_hidden=-(-8 * hidden // 3 // 256) * 256,
            vocab_size=vocab_size,
            seq_len=seq_len,
        )
        model_cls = Llama
    torch.manual_seed(0)
    with torch.device(device):
        module = model_cls(config).to(dtype)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=device)
    label = f"{family} h{hidden} l{num_layers} s{seq_len}"
    return Job(label, module, (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous(), language_model_loss)


def cluster_for(device: str, cluster_file: str | None) -> ClusterSpec:
    """One device: `--cluster` if given, else the preset of this GPU, else `local` (CPU)."""
    if cluster_file:
        cluster = ClusterSpec.from_file(cluster_file).model_copy(update={"num_nodes": 1, "devices_per_node": 1})
    elif device == "cpu":
        cluster = ClusterSpec.local(world_size=1)
    else:
        name = torch.cuda.get_device_name()
        preset = preset_for(name)
        if preset is None:
            raise ValueError(
                f"no preset describes {name!r}: calibrate it (`autoplan calibrate --device cuda`) "
                "and pass the file with --cluster"
            )
        cluster = ClusterSpec.preset(preset, devices_per_node=1)
    if cluster.device.kind != device:
        raise ValueError(f"--cluster describes a {cluster.device.kind} device but --device is {device}")
    return cluster


def preset_for(device_name: str) -> str | None:
    """The preset of a `torch.cuda.get_device_name`, None when none matches (PCIe and NVL
    boards have lower clocks and bandwidth than the SXM datasheets the presets quote).

    >>> preset_for("NVIDIA A100-SXM4-40GB"), preset_for("NVIDIA H100 80GB HBM3"), preset_for("NVIDIA H100 PCIe")
    ('dgx-a100-40gb', 'dgx-h100', None)
    """
    name = device_name.upper()
    if "PCIE" in name or "NVL" in name:
        return None
    for chip, preset in (("H200", "dgx-h200"), ("H100", "dgx-h100"), ("A100", "dgx-a100-80gb")):
        if chip in name:
            return "dgx-a100-40gb" if chip == "A100" and "40GB" in name else preset
    return None


# --- part 1: per-layer time ------------------------------------------------------------------


def validate_layers(sweep: Sweep, cluster: ClusterSpec, device: str) -> list[dict]:
    """One row per (family, hidden, seq_len, dtype): predicted and measured ms of one sequence."""
    from autoplan.analysis.profile import profile_model

    rows = []
    for dtype, hidden, seq_len, (family, block) in itertools.product(
        sweep.layer_dtypes, sweep.layer_hidden, sweep.layer_seq_len, FAMILIES.items()
    ):
        job = build_job(
            family,
            hidden=hidden,
            num_layers=1,
            seq_len=seq_len,
            vocab_size=LAYER_VOCAB,
            batch_size=1,
            device="meta",
            dtype=getattr(torch, dtype),
        )
        profile = profile_model(job.module, job.example_inputs, model_name=job.name, measure=True, device=device)
        layer = next(layer for layer in profile.layers if layer.name == block)
        # without the measured seconds: on a matching device they would replace the roofline
        roofline = layer.model_copy(update=dict.fromkeys(("measured_fwd_s", "measured_bwd_s", "measured_device")))
        predicted = estimate_layer_time(
            roofline,
            cluster.device,
            micro_batch_size=1,
            tp=1,
            sequence_parallel=False,
            recompute="none",
            compute_dtype=dtype,
        )
        predicted_s = predicted.forward_s + predicted.backward_s
        measured_s = layer.measured_fwd_s + layer.measured_bwd_s
        rows.append(
            {
                "model": family,
                "hidden": hidden,
                "seq_len": seq_len,
                "dtype": dtype,
                "predicted_ms": predicted_s * 1e3,
                "measured_ms": measured_s * 1e3,
                "error": relative_error(predicted_s, measured_s),
            }
        )
    return rows


# --- part 2: single device, end to end --------------------------------------------------------


def validate_plans(sweep: Sweep, cluster: ClusterSpec, device: str) -> list[dict]:
    """One row per (family, recompute option): the plan's prediction and the measured run."""
    import torch.distributed as dist

    from autoplan.runtime.launch import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    vocab_size = {"gpt": 50304, "llama": 32000} if device == "cuda" else {"gpt": 128, "llama": 128}
    rows = []
    try:
        for family in FAMILIES:
            for recompute in RECOMPUTE_OPTIONS:
                job = build_job(
                    family,
                    hidden=sweep.hidden,
                    num_layers=sweep.num_layers,
                    seq_len=sweep.seq_len,
                    vocab_size=vocab_size[family],
                    batch_size=sweep.global_batch_size,
                    device=device,
                )
                rows.append(run_plan(job, cluster, recompute, sweep.steps))
                del job
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rows


def run_plan(job: Job, cluster: ClusterSpec, recompute: str, steps: int) -> dict:
    """Plan `job` with `recompute` pinned, run it, and compare; a failure becomes the row's error."""
    import autoplan
    from autoplan.runtime.timing import measure_training

    row = {"model": job.name, "recompute": recompute}
    try:
        model = autoplan.parallelize(
            job.module,
            cluster,
            job.example_inputs,
            job.loss_fn,
            plan=Constraints(recompute=recompute),
            model_name=job.name,
        )
        measured = measure_training(model, [(job.example_inputs, job.targets)], steps=steps)
    except Exception as error:  # an OOM or a backend failure: report it and go on to the next plan
        return {**row, "failure": f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"}
    predicted = model.plan.predicted
    predicted_peak = predicted.peak_memory_bytes - predicted.breakdown.get("framework_overhead_bytes", 0.0)
    return {
        **row,
        "micro_batches": f"{model.plan.micro_batch_size} x {model.plan.num_micro_batches}",
        "dtype": model.plan.param_dtype,
        "predicted_step_ms": predicted.step_time_s * 1e3,
        "measured_step_ms": measured.median_step_s * 1e3,
        "step_error": relative_error(predicted.step_time_s, measured.median_step_s),
        "predicted_peak_mb": predicted_peak / 1e6,
        "measured_peak_mb": measured.peak_memory_bytes / 1e6,
        "memory_error": relative_error(predicted_peak, measured.peak_memory_bytes),
    }


# --- report ------------------------------------------------------------------------------------


def verdict(error: float) -> str:
    return "pass" if abs(error) <= THRESHOLD else "FAIL"


def layer_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "hidden", "seq", "dtype", "predicted ms", "measured ms", "error", "time"]
    return header, [
        [
            r["model"],
            str(r["hidden"]),
            str(r["seq_len"]),
            r["dtype"],
            f"{r['predicted_ms']:.3f}",
            f"{r['measured_ms']:.3f}",
            f"{r['error']:+.1%}",
            verdict(r["error"]),
        ]
        for r in rows
    ]


def plan_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "recompute",
        "mbs x m",
        "dtype",
        "pred step ms",
        "meas step ms",
        "error",
        "time",
        "pred peak MB",
        "meas peak MB",
        "error",
        "memory",
    ]
    body = []
    for r in rows:
        if "failure" in r:
            body.append([r["model"], r["recompute"], *["-"] * 5, "FAIL", *["-"] * 3, "FAIL"])
            continue
        body.append(
            [
                r["model"],
                r["recompute"],
                r["micro_batches"],
                r["dtype"],
                f"{r['predicted_step_ms']:.2f}",
                f"{r['measured_step_ms']:.2f}",
                f"{r['step_error']:+.1%}",
                verdict(r["step_error"]),
                f"{r['predicted_peak_mb']:,.1f}",
                f"{r['measured_peak_mb']:,.1f}",
                f"{r['memory_error']:+.1%}",
                verdict(r["memory_error"]),
            ]
        )
    return header, body


def failures(layer_rows: list[dict], plan_rows: list[dict]) -> list[str]:
    """One line per failing row, the arithmetic included."""
    lines = [
        f"FAIL layer {r['model']} h{r['hidden']} s{r['seq_len']} {r['dtype']}: "
        f"predicted {r['predicted_ms']:.3f} ms, measured {r['measured_ms']:.3f} ms ({r['error']:+.1%})"
        for r in layer_rows
        if verdict(r["error"]) == "FAIL"
    ]
    for r in plan_rows:
        if "failure" in r:
            lines.append(f"FAIL plan {r['model']} recompute={r['recompute']}: {r['failure']}")
        elif "FAIL" in (verdict(r["step_error"]), verdict(r["memory_error"])):
            lines.append(
                f"FAIL plan {r['model']} recompute={r['recompute']}: step {r['predicted_step_ms']:.2f} vs "
                f"{r['measured_step_ms']:.2f} ms ({r['step_error']:+.1%}), peak {r['predicted_peak_mb']:,.1f} "
                f"vs {r['measured_peak_mb']:,.1f} MB ({r['memory_error']:+.1%})"
            )
    return lines


def markdown(title: str, tables: list[tuple[str, tuple[list[str], list[list[str]]]]]) -> str:
    """`title` then each (heading, table) as a GitHub markdown table."""
    lines = [title, ""]
    for heading, (header, body) in tables:
        lines += [f"#### {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines.append("")
    return "\n".join(lines)


def summary(layer_rows: list[dict], plan_rows: list[dict]) -> str:
    """How many rows are within THRESHOLD, per part and quantity."""
    ran = [r for r in plan_rows if "failure" not in r]
    within = {
        key: sum(abs(r[key]) <= THRESHOLD for r in rows)
        for key, rows in (("error", layer_rows), ("step_error", ran), ("memory_error", ran))
    }
    return (
        f"summary: part 1 {within['error']}/{len(layer_rows)} layers within {THRESHOLD:.0%}; part 2 "
        f"{len(ran)}/{len(plan_rows)} plans ran, step time within {THRESHOLD:.0%} for {within['step_error']}, "
        f"peak memory for {within['memory_error']}"
    )


def print_tables(tables: list[tuple[str, tuple[list[str], list[list[str]]]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets the whole table
    for heading, (header, body) in tables:
        table = Table(title=heading)
        for column in header:
            table.add_column(
                column, justify="right" if column.endswith(("ms", "MB", "hidden", "seq", "error")) else "left"
            )
        for row in body:
            table.add_row(*row)
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    parser.add_argument("--cluster", default=None, help="a (calibrated) cluster file describing this device")
    parser.add_argument("--markdown", default=None, help="also write the tables as markdown for docs/validation.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    if args.device == "cpu":
        torch.set_num_threads(1)  # the `local` preset prices one core
    try:
        cluster = cluster_for(args.device, args.cluster)
    except ValueError as error:
        parser.error(str(error))
    sweep = SWEEPS[(args.device, args.quick)]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()}), 1 thread"
    heading = f"{name}, torch {torch.__version__}, {datetime.date.today().isoformat()}"
    heading += " (quick)" if args.quick else ""
    detail = (
        f"cost model: {cluster.describe()}{' (calibrated)' if cluster.calibrated else ''}; "
        f"pass: |predicted - measured| / measured <= {THRESHOLD:.0%}"
    )
    print(f"{heading}\n{detail}")
    layer_rows = validate_layers(sweep, cluster, args.device)
    plan_rows = validate_plans(sweep, cluster, args.device)
    tables = [
        ("Part 1: per-layer time, forward + backward of one sequence", layer_table(layer_rows)),
        (
            f"Part 2: single device end to end, median of {sweep.steps} steps; peak memory without the "
            "framework overhead",
            plan_table(plan_rows),
        ),
    ]
    print_tables(tables)
    print(summary(layer_rows, plan_rows))
    for line in failures(layer_rows, plan_rows):
        print(line)
    if args.markdown:
        write_atomically(Path(args.markdown), markdown(f"### {heading}\n\n{detail}", tables))
        print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
