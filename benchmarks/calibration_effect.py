"""How much calibration improves the predictions: the same bench with the `local` preset's
guessed figures and with this machine's measured ones.

    python benchmarks/calibration_effect.py            # calibrates local:4 (~40 s), benches twice
    python benchmarks/calibration_effect.py --cluster benchmarks/out/local4.calibrated.toml

Prints, for each cluster spec, the median |predicted - measured| / measured of step time
and peak memory over the candidates, and whether the planner's choice was the fastest
measured. Reports are written to benchmarks/out/.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from autoplan import ClusterSpec
from autoplan.bench import run_bench, summarize
from autoplan.calibrate import calibrate

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-small-demo")
    parser.add_argument("--cluster", default=None, help="a calibrated local:4 file (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    preset = ClusterSpec.local(world_size=4)
    calibrated = ClusterSpec.from_file(args.cluster) if args.cluster else calibrate(preset)
    rows = []
    for label, cluster in (("preset", preset), ("calibrated", calibrated)):
        report = run_bench(args.model, cluster, steps=args.steps, global_batch_size=args.global_batch_size,
                           rounds=args.rounds,
                           json_path=str(OUT / f"calibration_effect_{label}.json"))
        rows.append((label, summarize(report)))
    print(f"{args.model} on local:4, {args.steps} timed steps per candidate")
    print(f"{'cluster spec':<12} {'step err':>9} {'memory err':>11} {'chosen ms':>10} {'best ms':>8}  best")
    for label, s in rows:
        print(f"{label:<12} {_pct(s['step_error']):>9} {_pct(s['memory_error']):>11} "
              f"{_ms(s['chosen_step_s']):>10} {_ms(s['best_step_s']):>8}  {s['best_name']}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


if __name__ == "__main__":
    main()
