"""The `autoplan calibrate` and `autoplan profile` commands: measure this machine (its links
and matmul rate, or each distinct layer of a model) and write a file the planner reads
(`--cluster FILE`, `--profile FILE`). `autoplan.cli` parses their arguments and runs them."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from autoplan.schema.cluster import ClusterSpec

console = Console(stderr=False, highlight=False)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from autoplan.measure.calibrate import measure

    cluster = ClusterSpec.parse(args.cluster)
    device = args.device or cluster.device.kind
    measurement = measure(cluster, device=device)
    calibrated = measurement.apply(cluster)  # first: the table says which preset values it kept
    Console(highlight=False, width=None if sys.stdout.isatty() else 140).print(measurement.table())
    for line in measurement.warnings():
        console.print(f"[yellow]warning[/]: {line}")
    calibrated.to_file(args.output)
    console.print(f"wrote {args.output}: use it with --cluster {args.output}")


def cmd_profile(args: argparse.Namespace) -> None:
    import torch

    from autoplan.analysis.profile import profile_model
    from autoplan.measure.profile_store import (
        default_micro_batch_sizes,
        measure_zoo_profile,
        profile_table,
    )
    from autoplan.zoo import build

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = (
        _parse_sizes(args.micro_batch_sizes)
        if args.micro_batch_sizes
        else default_micro_batch_sizes(args.global_batch_size)
    )
    batch_size = max(args.global_batch_size, *sizes)
    job = build(args.model, batch_size=batch_size, seq_len=args.seq_len, device="meta")
    cluster = ClusterSpec.parse(args.cluster) if args.cluster else None
    measured = measure_zoo_profile(
        args.model,
        sizes,
        batch_size=batch_size,
        seq_len=args.seq_len,
        device=device,
        dtype=args.dtype,
    )
    measured.to_json(args.output)
    estimated = profile_model(
        job.module, job.example_inputs, model_name=args.model, loss_fn=job.loss_fn, targets=job.targets
    )
    cluster = cluster or _roofline_cluster(measured.device_name)
    wide = Console(highlight=False, width=None if sys.stdout.isatty() else 140)  # a log gets the whole table
    wide.print(profile_table(measured, estimated, cluster.device if cluster else None))
    console.print(
        f"wrote {args.output}: add --profile {args.output} to autoplan plan/run/bench "
        f"for a {measured.device_kind} cluster"
    )


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--micro-batch-sizes {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if min(sizes) < 1:
        raise ValueError(f"--micro-batch-sizes {text!r}: sizes must be >= 1")
    return sizes


def _roofline_cluster(device_name: str) -> ClusterSpec | None:
    """local:1 for "cpu"; for a GPU the preset sharing most of its name's parts
    ("NVIDIA H100 80GB HBM3" -> dgx-h100); None when no preset's name matches."""
    from autoplan.costmodels.devices import PRESETS

    if device_name == "cpu":
        return ClusterSpec.local(1)
    shared = {
        name: sum(part in device_name for part in preset["device"]["name"].split("-"))
        for name, preset in PRESETS.items()
    }
    best = max(shared, key=lambda name: shared[name])
    return ClusterSpec.preset(best) if shared[best] else None
