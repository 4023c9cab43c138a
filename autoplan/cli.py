"""The `autoplan` command line: plan, show, run, bench, calibrate, profile, demo.

    autoplan plan --model gpt3-175b --cluster dgx-a100-80gb:128 --global-batch-size 1536 -o plan.json
    autoplan show plan.json
    autoplan plan --model hf:examples/hf/llama3-8b.json --cluster dgx-h100:8   # a Hugging Face config.json
    autoplan profile --model gpt-small-demo --device cpu -o demo.cpu.json
    autoplan plan --model gpt-small-demo --cluster local:4 --profile demo.cpu.json
    autoplan run plan.json --nproc 4
    autoplan demo

User mistakes print one line `autoplan: error: ...` and exit with status 2; nothing is
left half-written.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console

from autoplan.bench.commands import cmd_bench, cmd_demo
from autoplan.measure.commands import cmd_calibrate, cmd_profile
from autoplan.schema.cluster import ClusterSpec, condensed
from autoplan.schema.constraints import Constraints

console = Console(stderr=False, highlight=False)

LAUNCHER_FLAG_PREFIXES = (
    "--nnodes",
    "--node-rank",
    "--node_rank",
    "--rdzv",
    "--master-addr",
    "--master_addr",
    "--master-port",
    "--master_port",
    "--max-restarts",
    "--monitor-interval",
)


MODEL_HELP = (
    "zoo name (e.g. gpt2-small, llama3-8b, megatron-1t), path/file.py:factory, or hf:PATH: a Hugging "
    "Face config.json or a folder holding one, built from the config on the meta device (no weights, "
    "no network; needs transformers)"
)


def _version() -> str:
    from autoplan import __version__

    return __version__


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or a negative is refused, not replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help=MODEL_HELP)
    parser.add_argument(
        "--cluster",
        required=required,
        help="PRESET:NUM_NODES (dgx-a100-80gb:16), local:N, or a cluster .toml/.json file",
    )
    parser.add_argument(
        "--global-batch-size",
        type=positive_int,
        default=None,
        help="sequences per optimizer step (default: max(8, world size))",
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens per sequence (default: the model's context length; hf: models at most 2048)",
    )
    parser.add_argument("--fix", default="", help="pins, e.g. dp=8,tp=4,pp=2,schedule=1f1b,zero_stage=1")
    parser.add_argument(
        "--profile", default=None, help="a file from `autoplan profile`: its measured layer times replace the roofline"
    )


def _add_profile_parser(commands) -> None:
    """`autoplan profile`: measure layers and write a profile file."""
    profile = commands.add_parser(
        "profile", help="measure each distinct layer on this machine's device and write a profile file for --profile"
    )
    profile.add_argument("--model", required=True, help=MODEL_HELP)
    profile.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to measure (default: cuda when available, else cpu)",
    )
    profile.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's)")
    profile.add_argument(
        "--global-batch-size", type=int, default=8, help="the batch the micro-batch sizes divide (default 8)"
    )
    profile.add_argument(
        "--micro-batch-sizes",
        default=None,
        help="comma-separated, e.g. 1,2,4 (default: powers of two up to 8 dividing the batch)",
    )
    profile.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="compute dtype (default: bfloat16 on cuda, float32 on cpu, as the planner's)",
    )
    profile.add_argument(
        "--cluster",
        default=None,
        help="the cluster whose device gives the roofline columns (default: local:1 on cpu, the "
        "matching DGX preset on cuda); layers are measured alone, and a local:N plan stretches "
        "them by its calibrated shared-core slowdown",
    )
    profile.add_argument("-o", "--output", default="profile.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoplan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"autoplan {_version()}")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="plan a model on a cluster and print the summary")
    _add_model_args(plan)
    plan.add_argument("-o", "--output", help="write the plan JSON here")

    show = commands.add_parser("show", help="the full report of a saved plan")
    show.add_argument("plan_file")
    show.add_argument(
        "--layers",
        action="store_true",
        help="one row per run of layers on each stage (default: folded over repeated blocks)",
    )
    show.add_argument("--json", action="store_true", help="print the same report as JSON")

    run = commands.add_parser(
        "run",
        help="launch a plan on this machine through torch's launcher "
        "(multi-node flags --nnodes/--node-rank/--rdzv-* pass through)",
    )
    run.add_argument("plan_file", nargs="?", help="a plan JSON (or give --model/--cluster to plan now)")
    _add_model_args(run, required=False)
    run.add_argument(
        "--nproc", type=int, default=None, help="processes on this node (default: the plan's devices per node)"
    )
    run.add_argument("--steps", type=int, default=5)
    run.add_argument(
        "--checkpoint-dir",
        default=None,
        help="resume from the newest complete checkpoint here and save into it (another world size: re-plan)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="with --checkpoint-dir: save every N steps (default: at the end)",
    )
    run.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every rank when one dies, up to this many times (torch's elastic agent); "
        "the ranks resume from --checkpoint-dir",
    )

    bench = commands.add_parser("bench", help="the chosen plan against hand-tuned baselines, predicted vs measured")
    _add_model_args(bench)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="launch every candidate this many times, interleaved; the median step is over all",
    )
    bench.add_argument("--json", dest="json_path", default=None)
    bench.add_argument("--plot", dest="plot_path", default=None)

    calibrate = commands.add_parser("calibrate", help="measure this machine and write a calibrated cluster file")
    calibrate.add_argument("--cluster", required=True, help="local:N or PRESET:NUM_NODES")
    calibrate.add_argument("--device", choices=("cpu", "cuda"), default=None)
    calibrate.add_argument("-o", "--output", default="cluster.calibrated.toml")

    _add_profile_parser(commands)

    demo = commands.add_parser("demo", help="plan a small GPT for local:4, run it, print predicted vs measured")
    demo.add_argument("--steps", type=int, default=5)
    return parser


def _make_plan(args: argparse.Namespace):
    from autoplan.planner.planning import plan as make_plan
    from autoplan.zoo import build

    cluster = ClusterSpec.parse(args.cluster)
    batch = args.global_batch_size or max(8, cluster.world_size)
    job = build(args.model, batch_size=batch, seq_len=args.seq_len, device="meta")
    started = time.perf_counter()
    plan = make_plan(
        job.module,
        cluster,
        example_inputs=job.example_inputs,
        loss_fn=job.loss_fn,
        constraints=Constraints.parse_fix(args.fix),
        model_name=args.model,
        profile_file=args.profile,
    )
    first = job.example_inputs[0]
    tokens = first.dim() == 2 and not first.is_floating_point()
    plan.seq_len = args.seq_len or (int(first.shape[1]) if tokens else None)
    plan.input_sources = {
        "global_batch_size": "--global-batch-size"
        if args.global_batch_size
        else f"default max(8, world size {cluster.world_size})",
        "seq_len": "--seq-len"
        if args.seq_len
        else ("the model's context length" if tokens else "not a sequence model"),
    }
    return plan, time.perf_counter() - started


def _summary(plan) -> str:
    predicted = plan.predicted
    capacity = plan.cluster.device.memory_bytes
    batch = (
        f"global batch {plan.global_batch_size} sequences ({plan.input_sources.get('global_batch_size', 'given')})"
        + (
            f" x {plan.seq_len} tokens ({plan.input_sources.get('seq_len', 'given')}) = "
            f"{plan.global_batch_size * plan.seq_len:,} tokens per step"
            if plan.seq_len
            else ""
        )
        + "\n"
    )
    return batch + (
        f"mesh {plan.mesh}  micro-batch {plan.micro_batch_size} x {plan.num_micro_batches}  "
        f"schedule {plan.schedule}{f' (v={plan.virtual_stages})' if plan.virtual_stages > 1 else ''}  "
        f"ZeRO-{plan.zero_stage}  sequence-parallel {plan.sequence_parallel}\n"
        f"predicted step {predicted.step_time_s:.4g} s, peak memory {predicted.peak_memory_bytes / 1e9:.3g} GB "
        f"of {capacity / 1e9:.3g} GB per device" + (f", MFU {predicted.mfu:.1%}" if predicted.mfu else "")
    )


def cmd_plan(args: argparse.Namespace) -> None:
    plan, seconds = _make_plan(args)
    console.print(f"[bold]{args.model}[/] on {plan.cluster.describe()} — planned in {seconds:.2f} s")
    console.print(_summary(plan))
    if args.output:
        plan.to_json(args.output)
        console.print(f"wrote {args.output}  (full report: autoplan show {args.output})")


def cmd_show(args: argparse.Namespace) -> None:
    from autoplan.planner.report import explain
    from autoplan.schema.plan import Plan

    plan = Plan.from_json(args.plan_file)
    if args.json:
        from autoplan.planner.report import report

        sys.stdout.write(json.dumps(report(plan, all_layers=args.layers), indent=2) + "\n")
    else:
        sys.stdout.write(explain(plan, all_layers=args.layers))


def _check_saved_plan(plan, args: argparse.Namespace) -> None:
    """Refuse, before any rank starts, a saved plan for another model than --model (when
    given) or than the model its name builds now (a zoo entry, a factory file or a config
    edited since planning)."""
    from autoplan.planner.planning import check_plan_matches
    from autoplan.zoo import build

    if args.model and args.model != plan.model_name:
        raise ValueError(
            f"--model {args.model} but {args.plan_file} was planned for {plan.model_name!r}: "
            f"drop --model, or re-plan with `autoplan plan --model {args.model}`"
        )
    if args.cluster and ClusterSpec.parse(args.cluster).fingerprint() != plan.cluster_fingerprint:
        raise ValueError(
            f"--cluster {args.cluster} is not the cluster {args.plan_file} was planned for: drop "
            f"--cluster, or re-plan with `autoplan plan --cluster {args.cluster}`"
        )
    job = build(plan.model_name, batch_size=plan.global_batch_size, seq_len=plan.seq_len, device="meta")
    check_plan_matches(plan, job.module, job.example_inputs)


def cmd_run(args: argparse.Namespace) -> None:
    from autoplan.runtime.launch import launch
    from autoplan.runtime.parallelize import check_devices

    scratch = None
    if args.plan_file:
        from autoplan.schema.plan import Plan

        if args.profile:
            raise ValueError("--profile applies when planning (--model/--cluster), not to a saved plan")
        plan_path = args.plan_file
        plan = Plan.from_json(plan_path)
        _check_saved_plan(plan, args)
    elif args.model and args.cluster:
        plan, _ = _make_plan(args)
        scratch = tempfile.TemporaryDirectory(prefix="autoplan-run-")  # the ranks read it; removed after
        plan_path = str(Path(scratch.name) / "plan.json")
        plan.to_json(plan_path)
    else:
        raise ValueError("give a plan file, or --model and --cluster to plan now")
    nproc = args.nproc or plan.cluster.devices_per_node
    check_devices(plan.cluster.device.kind, nproc)  # before any rank starts
    if args.max_restarts and not args.checkpoint_dir:
        raise ValueError("--max-restarts without --checkpoint-dir would restart from step 0: give --checkpoint-dir")
    console.print(f"launching {plan.model_name} on {nproc} process(es): {_summary(plan)}")
    try:
        result = launch(
            plan_path,
            nproc=nproc,
            steps=args.steps,
            out_path=None,
            launcher_args=[
                *args.launcher_args,
                *(["--max-restarts", str(args.max_restarts)] if args.max_restarts else []),
            ],
            seq_len=plan.seq_len,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
        )
    finally:
        if scratch is not None:
            scratch.cleanup()
    if args.checkpoint_dir:
        console.print(
            f"trained steps {result['resumed_from'] + 1}..{result['steps']} on {result['world_size']} rank(s), mesh "
            f"{result['mesh']} (resumed from step {result['resumed_from']}, restarts {result['restart_count']}); "
            f"last checkpoint {result['checkpoints'][-1] if result['checkpoints'] else '-'}"
        )
        return
    console.print(
        f"measured median step {result['median_step_s']:.4g} s "
        f"(predicted {plan.predicted.step_time_s:.4g} s); peak memory per rank "
        f"{[round(b / 1e6, 1) for b in result['peak_memory_bytes']]} MB"
    )


def one_line(error: BaseException) -> str:
    """An error's message on one line (a library's message may continue on further lines)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


COMMANDS = {
    "plan": cmd_plan,
    "show": cmd_show,
    "run": cmd_run,
    "bench": cmd_bench,
    "calibrate": cmd_calibrate,
    "profile": cmd_profile,
    "demo": cmd_demo,
}


GC_THRESHOLD = (50_000, 20, 10)
"""gc thresholds of a fresh `autoplan` process (Python's default: 700, 10, 10)."""
HARD_EXIT_COMMANDS = ("plan", "show")
"""Commands that start no process or thread and leave nothing open once they return."""


def _tune_gc() -> None:
    """Garbage collection for one command in a fresh process. Importing torch (and
    transformers' code for an hf: model) leaves about 10^6 long-lived objects that every
    full collection walks again while tracing allocates fast: `autoplan plan --model
    hf:examples/hf/llama3-8b.json --cluster dgx-h100:8` spent 1.9 s in collections. Freeze
    what exists now (module-level objects live until exit anyway) and collect the young
    generation less often: 0.7 s, most of it during `import torch`, before this runs.
    Reference cycles are still collected during the run."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _finish_process(status: int, command: str | None) -> int:
    """Flush, freeze the heap (the collections at interpreter exit would walk it all again,
    ~1.5 s after a plan) and, for HARD_EXIT_COMMANDS, run the atexit handlers and end the
    process without tearing down every module and object (~0.3 s more), as mypy does."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    if command in HARD_EXIT_COMMANDS:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    """The `autoplan` command; returns the exit status. `argv` None (the console script,
    `python -m autoplan.cli`) means this process's own arguments, and that the process
    ends with the command: its garbage collection is tuned for that (`_tune_gc`,
    `_finish_process`). Called with a list (tests, scripts), it changes nothing global."""
    if argv is None:
        _tune_gc()
    args = parse_args(argv)
    status = run_command(args)
    return status if argv is not None else _finish_process(status, args.command)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; `run` and `bench` keep torch launcher flags in `launcher_args`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run` and `bench` hand torch's launcher what they do not know themselves
    # (--nnodes, --node-rank, --rdzv-backend, --rdzv-endpoint, --rdzv-id, ...).
    if extra and (
        args.command not in ("run", "bench")
        or not all(arg.startswith(LAUNCHER_FLAG_PREFIXES) or not arg.startswith("-") for arg in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.launcher_args = extra
    return args


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: 0; a user mistake prints one line `autoplan: error: ...` and
    returns 2; a launched job that failed returns 1."""
    try:
        COMMANDS[args.command](args)
    except ValueError as error:  # a user mistake (AutoplanError included): one line, status 2
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"autoplan: error: {condensed(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a launched job failed: its message, not our traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"autoplan: failed: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
