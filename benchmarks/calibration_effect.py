"""How much calibration improves the predictions: the same bench with the `local` preset's
guessed figures, with this machine's measured ones (`autoplan calibrate`), and with those
plus the model's measured layer times (`autoplan profile` under local:4's load).

    python benchmarks/calibration_effect.py            # calibrates local:4 (~40 s), benches 3 times
    python benchmarks/calibration_effect.py --cluster benchmarks/out/local4.calibrated.toml --no-profile

Prints, for each, the median |predicted - measured| / measured of step time and peak
memory over the candidates, and the planner's choice against the fastest measured.
Reports are written to benchmarks/out/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoplan import ClusterSpec
from autoplan.bench.compare import run_bench, summarize
from autoplan.measure.calibrate import calibrate
from autoplan.measure.profile_store import default_micro_batch_sizes, measure_zoo_profile
from autoplan.planner.planning import planning_with_profile

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-small-demo")
    parser.add_argument("--cluster", default=None, help="a calibrated local:4 file (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true", help="skip the calibrated + profiled bench")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    preset = ClusterSpec.local(world_size=4)
    calibrated = ClusterSpec.from_file(args.cluster) if args.cluster else calibrate(preset)
    runs = [("preset", preset, None), ("calibrated", calibrated, None)]
    if not args.no_profile:
        profile_path = OUT / "calibration_effect_profile.json"
        measure_zoo_profile(
            args.model,
            default_micro_batch_sizes(args.global_batch_size),
            batch_size=args.global_batch_size,
            busy_peers=calibrated.devices_per_node - 1,
            peer_model=args.model,
        ).to_json(profile_path)
        runs.append(("+ profile", calibrated, str(profile_path)))
    rows = []
    for label, cluster, profile in runs:
        with planning_with_profile(profile):
            report = run_bench(
                args.model,
                cluster,
                steps=args.steps,
                global_batch_size=args.global_batch_size,
                rounds=args.rounds,
                json_path=str(OUT / f"calibration_effect_{label.strip('+ ')}.json"),
            )
        rows.append((label, summarize(report)))
    print(f"{args.model} on local:4, {args.steps} timed steps per candidate")
    print(f"{'cluster spec':<12} {'step err':>9} {'memory err':>11} {'chosen ms':>10} {'best ms':>8}  best")
    for label, s in rows:
        print(
            f"{label:<12} {_pct(s['step_error']):>9} {_pct(s['memory_error']):>11} "
            f"{_ms(s['chosen_step_s']):>10} {_ms(s['best_step_s']):>8}  {s['best_name']}"
        )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


if __name__ == "__main__":
    main()
