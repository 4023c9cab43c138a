"""The local benchmark the README quotes: calibrate this machine, then bench on local:4.

    python benchmarks/bench_local.py                   # calibrates (~1 min), profiles, benches (~10 min here)
    python benchmarks/bench_local.py --cluster local4.toml --steps 3 --rounds 1

For a small zoo GPT and the custom model of examples/custom_model.py, the planner's plan
and the hand-tuned baselines (DDP, FSDP, Megatron-style, pipeline) each run for `--steps`
timed steps through torch's launcher, `--rounds` times interleaved (this VM's speed drifts by
tens of percent over minutes; the median is over every round's steps). Prints, per model: the
chosen plan's measured step time against the best measured candidate, the median |predicted - measured| /
measured over the candidates of step time and of peak memory (worst rank), the worst
candidate's step-time error, and the errors the uncalibrated `local` preset predicts for the
same measured plans. Reports are written to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from autoplan import ClusterSpec
from autoplan.bench.compare import run_bench, summarize
from autoplan.bench.predict import measured_constraints, measured_step_s, plan_candidates, step_s
from autoplan.measure.calibrate import measure
from autoplan.measure.profile_store import default_micro_batch_sizes, measure_zoo_profile
from autoplan.planner.planning import planning_with_profile

MODELS = ("gpt-small-demo", str(Path(__file__).resolve().parent.parent / "examples" / "custom_model.py") + ":factory")
OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default=None, help="a calibrated cluster file (default: calibrate local:4 now)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="plan from the calibrated roofline only (default: also `autoplan profile` each model "
        "alone, stretched by the calibrated shared-core slowdown, and plan with the measured layer times)",
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.cluster:
        cluster = ClusterSpec.from_file(args.cluster)
    else:
        preset = ClusterSpec.local(world_size=4)
        measurement = measure(preset)
        cluster = measurement.apply(preset)
        cluster.to_file(OUT / "local4.calibrated.toml")
        for line in measurement.warnings():
            print(f"calibration warning: {line}")
        print(f"calibrated: {OUT / 'local4.calibrated.toml'}")
    lines = []
    for model in MODELS:
        label = label_of(model)
        profile_path = None if args.no_profile else str(OUT / f"profile_{label}.json")
        if profile_path:
            measure_zoo_profile(
                model,
                default_micro_batch_sizes(args.global_batch_size),
                batch_size=args.global_batch_size,
            ).to_json(profile_path)
        with planning_with_profile(profile_path):
            report = run_bench(
                model,
                cluster,
                steps=args.steps,
                global_batch_size=args.global_batch_size,
                rounds=args.rounds,
                json_path=str(OUT / f"bench_{label}.json"),
                plot_path=str(OUT / f"bench_{label}.png"),
            )
        lines.append(describe(label, summarize(report)) + "; " + against_preset(model, report, args.global_batch_size))
    print("\n".join(lines))


def against_preset(model: str, report: dict, global_batch_size: int) -> str:
    """The worst candidate's signed step-time error, and the median error the uncalibrated
    `local` preset (roofline) predicts for the same measured plans: what calibrating bought."""
    errors = {
        c["name"]: (c["predicted_step_s"] - c["measured_step_s"]) / c["measured_step_s"]
        for c in report["candidates"]
        if c["measured_step_s"]
    }
    if not errors:
        return "nothing measured"
    worst = max(errors, key=lambda name: abs(errors[name]))
    preset = ClusterSpec.local(world_size=4)
    plans = plan_candidates(model, preset, global_batch_size, pinned=measured_constraints(report))
    measured = measured_step_s(report)
    preset_errors = [abs(step_s(plans, n, preset) - t) / t for n, t in measured.items() if n in plans.solutions]
    return (
        f"worst candidate {worst} {errors[worst]:+.0%}; the uncalibrated preset on the same plans: "
        f"median {statistics.median(preset_errors):.0%}, worst {max(preset_errors):.0%}"
    )


def label_of(model: str) -> str:
    """The name a model's reports and profiles are written under: a zoo name, or the file's stem."""
    return Path(model.split(":")[0]).stem if ":" in model else model


def describe(label: str, summary: dict) -> str:
    """One paragraph per model: chosen vs best measured, and the prediction errors."""
    if not summary["num_ran"]:
        return f"{label}: no candidate ran"
    chosen = summary["chosen_step_s"]
    versus = (
        f"chosen plan {chosen * 1e3:.1f} ms/step vs best measured {summary['best_name']} "
        f"{summary['best_step_s'] * 1e3:.1f} ms/step (ratio {chosen / summary['best_step_s']:.2f})"
        if chosen
        else "the chosen plan did not run"
    )
    memory = f"{summary['memory_error']:.0%}" if summary["memory_error"] is not None else "-"
    return (
        f"{label}: {versus}; median |pred-meas|/meas over {summary['num_ran']}/{summary['num_candidates']} "
        f"candidates: step time {summary['step_error']:.0%}, peak memory {memory}"
    )


if __name__ == "__main__":
    main()
