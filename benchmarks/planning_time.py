"""How long planning takes: model x cluster size, from the model on the meta device to the
Plan (building, tracing/profiling and solving all included).

    python benchmarks/planning_time.py            # prints a rich table, then the fresh-process times

The table's rows run in this one process, in order: a row's wall time does not include
importing torch, and the first `hf:` row includes importing Hugging Face Transformers' code
for its architecture (skipped when transformers is not installed). The lines after the table
time `autoplan plan` as a user types it: a fresh process, every import, build, trace,
profile and solve included.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autoplan.planner.planning import plan
from autoplan.schema.cluster import ClusterSpec
from autoplan.zoo import build

REPO = Path(__file__).resolve().parents[1]
HF_LLAMA3_8B = "hf:examples/hf/llama3-8b.json"  # relative to REPO, where the commands run
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
REPEATS = 3
"""Fresh `autoplan plan` processes per command (the spread goes with the number)."""

# (model, cluster, global batch)
CASES = [
    ("gpt2-small", "dgx-a100-80gb:1", 64),
    ("gpt2-xl", "dgx-a100-80gb:4", 256),
    ("llama2-7b", "dgx-a100-80gb:8", 512),
    ("llama2-70b", "dgx-a100-80gb:32", 1024),
    ("gpt3-175b", "dgx-a100-80gb:128", 1536),  # target: <= 10 s
    ("megatron-1t", "dgx-a100-80gb:384", 3072),  # target: <= 30 s
    (HF_LLAMA3_8B, "dgx-h100:8", 64),  # Llama 3 8B from its Hugging Face config.json
]
# fresh `autoplan plan` processes: (model, cluster, global batch or None for the CLI's default, target s)
COMMANDS = [
    ("gpt3-175b", "dgx-a100-80gb:128", 1536, 10),
    ("megatron-1t", "dgx-a100-80gb:384", 3072, 30),
    (HF_LLAMA3_8B, "dgx-h100:8", None, 10),  # the CLI's default batch: max(8, world size) = 64
]


def main() -> int:
    table = Table(title="planning time (wall, this machine)")
    for column in (
        "model",
        "cluster",
        "GPUs",
        "global batch",
        "wall s",
        "MILPs solved",
        "candidates",
        "chosen mesh",
        "mbs",
        "schedule",
        "ZeRO",
        "predicted step s",
        "MFU",
    ):
        table.add_column(column, justify="right")
    for name, cluster_text, batch in CASES:
        if name.startswith("hf:") and not HAVE_TRANSFORMERS:
            continue
        cluster = ClusterSpec.parse(cluster_text)
        started = time.perf_counter()
        job = build(f"hf:{REPO / name[3:]}" if name.startswith("hf:") else name, batch_size=batch, device="meta")
        result = plan(job.module, cluster, job.example_inputs, loss_fn=job.loss_fn, model_name=name)
        wall = time.perf_counter() - started
        mesh = result.mesh
        table.add_row(
            name,
            cluster_text,
            str(cluster.world_size),
            str(batch),
            f"{wall:.2f}",
            f"{result.solver.get('milps_solved', 0):.0f}",
            f"{result.solver.get('candidates', 0):.0f}",
            f"dp{mesh['dp']} pp{mesh['pp']} tp{mesh['tp']}",
            str(result.micro_batch_size),
            result.schedule + (f" v{result.virtual_stages}" if result.virtual_stages > 1 else ""),
            str(result.zero_stage),
            f"{result.predicted.step_time_s:.3g}",
            f"{result.predicted.mfu:.1%}",
        )
    console = Console(width=190)
    console.print(table)
    # The acceptance targets are for the command a user types: a fresh process, torch import,
    # model build, trace, profile and solve all included.
    for name, cluster_text, batch, target_s in COMMANDS:
        if name.startswith("hf:") and not HAVE_TRANSFORMERS:
            continue
        arguments = ["plan", "--model", name, "--cluster", cluster_text] + (
            ["--global-batch-size", str(batch)] if batch else []
        )
        walls = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "autoplan.cli", *arguments], check=True, capture_output=True, cwd=REPO
            )
            walls.append(time.perf_counter() - started)
        console.print(
            f"`autoplan {' '.join(arguments[:5])}` wall over {REPEATS} runs: median "
            f"{statistics.median(walls):.1f} s, min {min(walls):.1f}, max {max(walls):.1f} "
            f"(target <= {target_s} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
