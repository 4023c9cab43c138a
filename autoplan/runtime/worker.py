"""What every rank of `autoplan run` / `autoplan bench` executes, started by torch's launcher:

    python -m torch.distributed.run --nproc-per-node 4 -m autoplan.worker \\
        --model gpt-small-demo --plan plan.json --steps 5 --out result.json

Each rank builds the model (a zoo name, `hf:PATH` or `file.py:factory`) and one global
batch on CPU, or on its GPU when the plan's cluster is CUDA. Zoo and `hf:` modules are
built on the meta device: `autoplan.parallelize` splits them, then each rank allocates
and initialises only its own shard (`autoplan.backends.materialize`); a factory's module
is used where the factory built it (on meta too, if it builds it under
`with torch.device("meta"):`). The rank then trains `--steps` timed steps after warm-up
with `measure_training`, and sends its step times and peak memory (of the start and of
training) to rank 0, which writes the JSON result whole (temp file + rename).

CPU ranks run one thread each (`torch.set_num_threads(1)`): local plans assume one
core per rank. A failure exits non-zero with one line on stderr,
`autoplan.worker: rank R: <what went wrong>` (set AUTOPLAN_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

ERROR_PREFIX = "autoplan.worker:"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoplan.runtime.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="zoo name or path/to/file.py:factory")
    parser.add_argument("--plan", required=True, help="plan JSON written by `autoplan plan -o`")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (memory is measured over these)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length the plan was made for")
    parser.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="resume from the newest checkpoint here and save into it"
    )
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: after the last)")
    return parser


def _build_job(args: argparse.Namespace, plan, device: str):
    """The model (on meta: each rank materialises its shard) and the plan's global batch on `device`."""
    from autoplan.zoo import build

    job = build(
        args.model, batch_size=plan.global_batch_size, seq_len=args.seq_len, device=device, seed=0, module_device="meta"
    )
    batch_size = job.example_inputs[0].shape[0]
    if batch_size != plan.global_batch_size:
        raise ValueError(
            f"the model's inputs hold a global batch of {batch_size} but the plan was made for "
            f"global_batch_size={plan.global_batch_size}"
        )
    return job


def run(args: argparse.Namespace) -> dict | None:
    """Train and measure on this rank; rank 0 returns the gathered result, others None."""
    import torch
    import torch.distributed as dist

    from autoplan.runtime.parallelize import init_process_group_from_env, parallelize
    from autoplan.runtime.resume import plan_for_world
    from autoplan.runtime.timing import AllocationTracker, measure_training
    from autoplan.schema.plan import Plan

    plan = Plan.from_json(args.plan)
    device_kind = plan.cluster.device.kind
    if device_kind == "cpu":
        torch.set_num_threads(1)
        device = "cpu"
    else:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    init_process_group_from_env(device_kind)
    job = _build_job(args, plan, device)
    plan_to_run, cluster = plan_for_world(plan, dist.get_world_size(), resuming=args.checkpoint_dir is not None)
    with AllocationTracker() if device_kind == "cpu" else contextlib.nullcontext() as start_tracker:
        model = parallelize(
            job.module, cluster, job.example_inputs, job.loss_fn, plan=plan_to_run, model_name=plan.model_name
        )
    if plan_to_run is None and dist.get_rank() == 0:
        sys.stderr.write(
            f"{ERROR_PREFIX} the plan was made for {plan.world_size} ranks, the job has {dist.get_world_size()}: "
            f"re-planned: mesh {model.plan.mesh}; the checkpoint is resharded into it\n"
        )
    start_peak = start_tracker.peak_bytes if start_tracker is not None else torch.cuda.max_memory_allocated()
    if args.checkpoint_dir is not None:
        return _resumable_result(args, model, job, start_peak)
    measurement = measure_training(model, [(job.example_inputs, job.targets)], steps=args.steps, warmup=args.warmup)
    mine = {
        "step_times_s": measurement.step_times_s,
        "peak_memory_bytes": measurement.peak_memory_bytes,
        "start_peak_memory_bytes": start_peak,
        "losses": measurement.losses,
    }
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    # every step is barrier-bracketed, so a step's time is its slowest rank's
    step_times = [max(rank["step_times_s"][i] for rank in gathered) for i in range(args.steps)]
    median_step_s = statistics.median(step_times)
    first = job.example_inputs[0]
    tokens_per_step = first.numel() if not first.is_floating_point() else first.shape[0]
    peaks = [rank["peak_memory_bytes"] for rank in gathered]
    return {
        "model": args.model,
        "plan": str(Path(args.plan).resolve()),
        "device": device_kind,
        "world_size": dist.get_world_size(),
        "mesh": plan.mesh,
        "steps": args.steps,
        "warmup": args.warmup,
        "global_batch_size": plan.global_batch_size,
        "tokens_per_step": tokens_per_step,
        "median_step_s": median_step_s,
        "step_times_s": step_times,
        "rank_step_times_s": [rank["step_times_s"] for rank in gathered],
        "tokens_per_s": tokens_per_step / median_step_s,
        "peak_memory_bytes": peaks,
        "max_peak_memory_bytes": max(peaks),
        "start_peak_memory_bytes": [rank["start_peak_memory_bytes"] for rank in gathered],
        "predicted_step_s": plan.predicted.step_time_s,
        "predicted_peak_memory_bytes": plan.predicted.peak_memory_bytes,
        "losses": gathered[0]["losses"],
    }


def _resumable_result(args: argparse.Namespace, model, job, start_peak: float) -> dict | None:
    """Train with checkpoints (`autoplan.runtime.resume`); rank 0 returns what the job did."""
    import torch.distributed as dist

    from autoplan.runtime.resume import train_resumable

    done = train_resumable(
        model, (job.example_inputs, job.targets), args.steps, args.checkpoint_dir, args.checkpoint_every
    )
    gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, done.step_times_s)
    if dist.get_rank() != 0:
        return None
    step_times = [max(times[i] for times in gathered) for i in range(len(done.step_times_s))]
    return {
        "model": args.model,
        "world_size": dist.get_world_size(),
        "mesh": model.plan.mesh,
        "steps": args.steps,
        "resumed_from": done.resumed_from,
        "losses": done.losses,
        "step_times_s": step_times,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "checkpoints": done.saved,
        "start_peak_memory_bytes": start_peak,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        result = run(args)
        if result is not None:
            from autoplan.schema.cluster import write_atomically

            write_atomically(Path(args.out), json.dumps(result, indent=2) + "\n")
        # Leave together, and without tearing gloo down: a rank destroying its process group
        # while its peer still holds the pair connections made rank 0 abort (SIGABRT) now and
        # then after the last collective, with the barrier too (seen on a loaded 2-core CI
        # machine). Past the barrier every rank has written what it had to; the operating
        # system closes the sockets when the process ends.
        import torch.distributed as dist

        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except Exception as error:  # one line per failing rank; the launcher stops the others
        import torch

        what = "out of memory" if isinstance(error, (MemoryError, torch.OutOfMemoryError)) else type(error).__name__
        message = " ".join(str(error).split())[:500]
        sys.stderr.write(f"{ERROR_PREFIX} rank {rank}: {what}: {message}\n")  # one write: ranks share the pipe
        sys.stderr.flush()
        if os.environ.get("AUTOPLAN_DEBUG"):
            traceback.print_exc()
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
