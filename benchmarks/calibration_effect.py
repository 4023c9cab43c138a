"""How much calibration improves the predictions: the bench's candidates planned with the
`local` preset's guessed figures, with this machine's measured ones (`autoplan calibrate`),
and with those plus the model's measured layer times (`autoplan profile`, alone, stretched by
the calibrated shared-core slowdown), each against the same measurements.

    python benchmarks/calibration_effect.py            # calibrates local:4 (~1 min), profiles, benches
    python benchmarks/calibration_effect.py --cluster benchmarks/out/local4.calibrated.toml --no-profile

Each cluster spec plans the bench's candidates (the planner's choice and the DDP, FSDP,
Megatron-style and pipeline baselines). Every distinct configuration among them (mesh,
micro-batch, schedule, ZeRO stage, recompute) is then run once per round, the rounds
interleaved, and each spec's predictions are compared with those same measurements: a
shared machine's speed drifts by tens of percent over minutes, and three benches one after
the other would compare the specs on three different machines.

Prints, per spec, the median |predicted - measured| / measured of step time and peak
memory over its candidates, and its choice's measured step against the fastest measured of
its candidates. Reports are written to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from autoplan import ClusterSpec
from autoplan.bench.compare import run_bench
from autoplan.bench.predict import entry_key, pinned_constraints, plan_candidates, solution_key
from autoplan.measure.calibrate import measure
from autoplan.measure.profile_store import default_micro_batch_sizes, measure_zoo_profile
from autoplan.planner.planning import planning_with_profile

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-small-demo")
    parser.add_argument("--cluster", default=None, help="a calibrated local:4 file (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true", help="skip the calibrated + profiled spec")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    preset = ClusterSpec.local(world_size=4)
    if args.cluster:
        calibrated = ClusterSpec.from_file(args.cluster)
    else:
        measurement = measure(preset)
        calibrated = measurement.apply(preset)
        calibrated.to_file(OUT / "calibration_effect.calibrated.toml")
        for line in measurement.warnings():
            print(f"calibration warning: {line}")
    specs = {"preset": (preset, None), "calibrated": (calibrated, None)}
    if not args.no_profile:
        profile_path = OUT / "calibration_effect_profile.json"
        measure_zoo_profile(
            args.model,
            default_micro_batch_sizes(args.global_batch_size),
            batch_size=args.global_batch_size,
        ).to_json(profile_path)
        specs["+ profile"] = (calibrated, str(profile_path))
    planned = {
        label: plan_candidates(args.model, cluster, args.global_batch_size, profile)
        for label, (cluster, profile) in specs.items()
    }
    distinct = {}
    for plans in planned.values():
        for solution in plans.solutions.values():
            distinct.setdefault(solution_key(solution), pinned_constraints(solution))
    with planning_with_profile(specs["+ profile"][1] if "+ profile" in specs else None):
        report = run_bench(
            args.model,
            calibrated,
            steps=args.steps,
            fixes=list(distinct.values()),
            global_batch_size=args.global_batch_size,
            rounds=args.rounds,
            baselines=False,
            planner_choice=False,
            json_path=str(OUT / "calibration_effect.json"),
        )
    measured = {entry_key(c): c for c in report["candidates"] if c["measured_step_s"]}
    rows = [(label, _summary(planned[label], measured)) for label in specs]
    (OUT / "calibration_effect_summary.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    print(
        f"{args.model} on local:4, {args.steps} timed steps per configuration x {args.rounds} round(s), "
        f"{len(distinct)} distinct configurations"
    )
    print(
        f"{'cluster spec':<12} {'step err':>9} {'worst':>6} {'memory err':>11} {'chosen ms':>10} {'best ms':>8}  best"
    )
    for label, s in rows:
        print(
            f"{label:<12} {_pct(s['step_error']):>9} {_pct(s['worst_step_error']):>6} {_pct(s['memory_error']):>11} "
            f"{_ms(s['chosen_step_s']):>10} {_ms(s['best_step_s']):>8}  {s['best_name']}"
        )


def _summary(plans, measured: dict[str, dict]) -> dict:
    """A spec's candidates against the measurements of their configurations."""
    step, memory, times = [], [], {}
    for name, solution in plans.solutions.items():
        entry = measured.get(solution_key(solution))
        if entry is None:
            continue
        times[name] = entry["measured_step_s"]
        step.append(abs(solution.estimate.step_time_s - times[name]) / times[name])
        if entry["measured_peak_memory_bytes"]:
            memory.append(
                abs(solution.estimate.peak_memory_bytes - entry["measured_peak_memory_bytes"])
                / entry["measured_peak_memory_bytes"]
            )
    best = min(times, key=lambda name: times[name], default=None)
    return {
        "num_ran": len(times),
        "step_error": statistics.median(step) if step else None,
        "worst_step_error": max(step) if step else None,
        "memory_error": statistics.median(memory) if memory else None,
        "chosen_step_s": times.get("autoplan"),
        "best_name": best,
        "best_step_s": best and times[best],
        "errors": {name: err for name, err in zip(times, step)},
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


if __name__ == "__main__":
    main()
