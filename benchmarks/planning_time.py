"""How long planning takes: model x cluster size, from the zoo model on the meta device
to the Plan (building, tracing/profiling and solving all included).

    python benchmarks/planning_time.py            # prints a rich table
"""
from __future__ import annotations

import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from autoplan.api import plan
from autoplan.cluster import ClusterSpec
from autoplan.zoo import build

# (model, nodes of dgx-a100-80gb, global batch) — the last two are the acceptance targets
CASES = [
    ("gpt2-small", 1, 64),
    ("gpt2-xl", 4, 256),
    ("llama2-7b", 8, 512),
    ("llama2-70b", 32, 1024),
    ("gpt3-175b", 128, 1536),   # target: <= 10 s
    ("megatron-1t", 384, 3072),  # target: <= 30 s
]


def main() -> int:
    table = Table(title="planning time (wall, this machine)")
    for column in ("model", "GPUs", "global batch", "wall s", "MILPs solved", "candidates", "chosen mesh",
                   "mbs", "schedule", "ZeRO", "predicted step s", "MFU"):
        table.add_column(column, justify="right")
    for name, nodes, batch in CASES:
        cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=nodes)
        started = time.perf_counter()
        job = build(name, batch_size=batch, device="meta")
        result = plan(job.module, cluster, job.example_inputs, loss_fn=job.loss_fn, model_name=name)
        wall = time.perf_counter() - started
        mesh = result.mesh
        table.add_row(name, str(cluster.world_size), str(batch), f"{wall:.2f}",
                      f"{result.solver.get('milps_solved', 0):.0f}", f"{result.solver.get('candidates', 0):.0f}",
                      f"dp{mesh['dp']} pp{mesh['pp']} tp{mesh['tp']}", str(result.micro_batch_size),
                      result.schedule + (f" v{result.virtual_stages}" if result.virtual_stages > 1 else ""),
                      str(result.zero_stage), f"{result.predicted.step_time_s:.3g}", f"{result.predicted.mfu:.1%}")
    console = Console(width=170)
    console.print(table)
    # The acceptance targets are for the command a user types: a fresh process, torch import,
    # zoo build, trace, profile and solve all included.
    for name, nodes, batch, target_s in (("gpt3-175b", 128, 1536, 10), ("megatron-1t", 384, 3072, 30)):
        command = [sys.executable, "-m", "autoplan.cli", "plan", "--model", name,
                   "--cluster", f"dgx-a100-80gb:{nodes}", "--global-batch-size", str(batch)]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        console.print(f"`autoplan plan --model {name} --cluster dgx-a100-80gb:{nodes}` wall: "
                      f"{time.perf_counter() - started:.1f} s (target <= {target_s} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
