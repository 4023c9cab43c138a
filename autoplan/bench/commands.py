"""The `autoplan bench` and `autoplan demo` commands (the CLI, `autoplan.cli`, parses their arguments)."""

from __future__ import annotations

import argparse
import importlib.util

from rich.console import Console

from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints

console = Console(stderr=False, highlight=False)

DEMO_MODEL = "gpt-small-demo"
DEMO_CLUSTER = "local:4"
DEMO_BATCH = 16


def cmd_bench(args: argparse.Namespace) -> None:
    from autoplan.bench.compare import run_bench
    from autoplan.planner.planning import planning_with_profile
    from autoplan.schema.profile_file import ProfileFile

    fixes = [Constraints.parse_fix(args.fix)] if args.fix else []
    if args.plot_path and importlib.util.find_spec("matplotlib") is None:  # before the benchmark, not after
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or autoplan[plot])")
    if args.profile:
        ProfileFile.from_json(args.profile)  # a bad file is one error, not one failed candidate each
    with planning_with_profile(args.profile):
        run_bench(
            args.model,
            ClusterSpec.parse(args.cluster),
            steps=args.steps,
            fixes=fixes,
            global_batch_size=args.global_batch_size,
            seq_len=args.seq_len,
            json_path=args.json_path,
            plot_path=args.plot_path,
            launcher_args=args.launcher_args,
            rounds=args.rounds,
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from autoplan.bench.compare import run_bench

    console.print(
        f"[bold]autoplan demo[/]: plan {DEMO_MODEL} (global batch {DEMO_BATCH}) for {DEMO_CLUSTER}, "
        f"run it with torch's launcher, compare predicted with measured"
    )
    report = run_bench(
        DEMO_MODEL, ClusterSpec.parse(DEMO_CLUSTER), steps=args.steps, global_batch_size=DEMO_BATCH, baselines=False
    )
    chosen = next(c for c in report["candidates"] if c["chosen"])
    if chosen.get("status") != "ok":
        raise RuntimeError(f"the demo plan did not run: {chosen.get('status')}")
    per_rank = chosen["measured_peak_memory_bytes_per_rank"]
    shown = ("micro_batch_size", "num_micro_batches", "schedule", "zero_stage", "sequence_parallel")
    console.print(
        f"plan: mesh {chosen['mesh']}, " + ", ".join(f"{k} {chosen['plan'][k]}" for k in shown if k in chosen["plan"])
    )
    console.print(
        f"step time: predicted {chosen['predicted_step_s']:.3f} s, "
        f"measured {chosen['measured_step_s']:.3f} s (median of {args.steps})"
    )
    console.print(
        f"peak memory per rank: predicted {chosen['predicted_peak_memory_bytes'] / 1e6:.1f} MB (worst rank), "
        f"measured " + ", ".join(f"rank {r}: {b / 1e6:.1f} MB" for r, b in enumerate(per_rank))
    )
    console.print(
        "The prediction used the `local` preset's guessed figures. For this machine's: "
        f"`autoplan calibrate --cluster local:4 -o local4.toml`, `autoplan profile --model {DEMO_MODEL} "
        f"--cluster local4.toml --global-batch-size {DEMO_BATCH} -o demo.json`, then `autoplan bench "
        f"--model {DEMO_MODEL} --cluster local4.toml --global-batch-size {DEMO_BATCH} --profile demo.json`."
    )
