"""Is `autoplan calibrate` reproducible, and which of its constants matter? Planning only:
nothing trains here.

    python benchmarks/calibration_repeat.py                  # calibrates local:4 twice (~2 x 1 min)
    python benchmarks/calibration_repeat.py --clusters a.toml b.toml
    python benchmarks/calibration_repeat.py --ablate         # after benchmarks/bench_local.py

Repeat (the default): calibrates local:4 twice in a row (or reads two calibrated files) and
prints, for the candidates of benchmarks/bench_local.py (the planner's choice and the
baselines, each planned once on the first calibration), the predicted step time under
each calibration and their relative difference. The roofline is used (no profile): it is
the prediction that depends on every calibrated constant.

Ablation (--ablate): reads the reports and profiles benchmarks/bench_local.py wrote to
benchmarks/out/ and the calibrated file it used, pins each measured candidate to the
configuration that ran, and prices it with the calibration as measured, with the preset,
and with each calibrated quantity (`autoplan.measure.calibration.CONSTANT_GROUPS`) set back
to its preset value in turn: the median and worst |predicted - measured| / measured over
the candidates, with the measured layer times (as the bench planned) and with the roofline;
then, per model, its layers' time priced by the calibrated roofline over the profiled one.
docs/cost_model.md quotes this table ("Which constants matter").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

from bench_local import MODELS, OUT, label_of

from autoplan import ClusterSpec
from autoplan.bench.predict import measured_constraints, measured_step_s, model_profile, plan_candidates, step_s
from autoplan.measure.calibrate import measure
from autoplan.measure.calibration import CONSTANT_GROUPS, quantity_value, reset_quantities

GLOBAL_BATCH_SIZE = 8


def calibrated_twice(paths: list[str] | None) -> list[ClusterSpec]:
    """Two calibrated local:4 specs: read from `paths`, or measured now one after the other."""
    if paths:
        return [ClusterSpec.from_file(path) for path in paths]
    preset, specs = ClusterSpec.local(world_size=4), []
    OUT.mkdir(exist_ok=True)
    for index in (1, 2):
        measurement = measure(preset, progress=False)
        specs.append(measurement.apply(preset))
        specs[-1].to_file(OUT / f"local4.repeat{index}.toml")
        for line in measurement.warnings():
            print(f"calibration {index}: warning: {line}")
        print(f"calibration {index}: {measurement.wall_s:.0f} s, written to {OUT / f'local4.repeat{index}.toml'}")
    return specs


def repeat(paths: list[str] | None) -> None:
    first, second = calibrated_twice(paths)
    print(f"\n{'calibrated quantity':<24} {'calib. 1':>10} {'calib. 2':>10} {'diff':>7}")
    for quantity in CONSTANT_GROUPS:
        a, b = quantity_value(first, quantity), quantity_value(second, quantity)
        print(f"{quantity:<24} {a:>10.4g} {b:>10.4g} {(b - a) / a if a else 0.0:>+7.0%}")
    print(f"\npredicted step time (roofline, global batch {GLOBAL_BATCH_SIZE}), same plan under both calibrations")
    print(f"{'model':<16} {'candidate':<10} {'mesh dp/pp/tp':>13} {'calib. 1 ms':>12} {'calib. 2 ms':>12} {'diff':>7}")
    differences = []
    for model in MODELS:
        plans = plan_candidates(model, first, GLOBAL_BATCH_SIZE)
        for name, solution in plans.solutions.items():
            a, b = step_s(plans, name, first), step_s(plans, name, second)
            differences.append(abs(b - a) / a)
            mesh = solution.config.mesh
            shape = f"{mesh['dp']}/{mesh['pp']}/{mesh['tp']}"
            print(
                f"{label_of(model):<16} {name:<10} {shape:>13} {a * 1e3:>12.1f} {b * 1e3:>12.1f} {(b - a) / a:>+7.1%}"
            )
        for name, why in plans.failed.items():
            print(f"{label_of(model):<16} {name:<10} not planned: {why}")
    print(
        f"relative difference over {len(differences)} candidates: median {statistics.median(differences):.1%}, "
        f"largest {max(differences):.1%} (target <= 10%)"
    )


def _errors(
    plans_by_model: list, measured: list[dict[str, float]], cluster: ClusterSpec, profile_files: list
) -> list[float]:
    """|predicted - measured| / measured of every measured candidate under `cluster`; measured
    layer times (`profile_files`, None for the roofline) stretched by `cluster`'s shared-core slowdown."""
    errors = []
    for plans, times, profile_file in zip(plans_by_model, measured, profile_files):
        if profile_file:  # the stretch of profiled layers is `cluster`'s, not the planning one's
            profile = model_profile(plans.model, cluster, GLOBAL_BATCH_SIZE, profile_file)
            plans = dataclasses.replace(plans, profile=profile)
        errors += [abs(step_s(plans, name, cluster) - t) / t for name, t in times.items() if name in plans.solutions]
    return errors


def without_sharing(calibrated: ClusterSpec, preset: ClusterSpec) -> ClusterSpec:
    """`calibrated` as if it had measured the preset's shared-core slowdown: calibration times the
    CPU rates on one rank alone and divides them by the slowdown it measured
    (`Calibration.apply`) and multiplies the per-op host cost by it, so taking the slowdown out
    also takes it out of those (and out of the stretch of profiled layers, `_errors`)."""
    ratio = calibrated.device.shared_core_slowdown / preset.device.shared_core_slowdown
    spec = reset_quantities(calibrated, preset, ["shared-core slowdown"])
    device = spec.device.model_copy(
        update={
            "peak_flops": {dtype: rate * ratio for dtype, rate in spec.device.peak_flops.items()},
            "memory_bandwidth_gbps": spec.device.memory_bandwidth_gbps * ratio,
            "op_overhead_us": spec.device.op_overhead_us / ratio,
        }
    )
    return spec.model_copy(update={"device": device})


def ablate(cluster_path: str) -> None:
    preset = ClusterSpec.local(world_size=4)
    calibrated = ClusterSpec.from_file(cluster_path)
    reports = []
    for model in MODELS:
        path = OUT / f"bench_{label_of(model)}.json"
        if not path.exists():
            sys.exit(f"{path} is missing: run benchmarks/bench_local.py first")
        reports.append((model, json.loads(path.read_text())))
    variants = {"calibrated (as measured)": calibrated, "preset (every quantity)": preset}
    for quantity in CONSTANT_GROUPS:
        variants[f"- {quantity}"] = (
            without_sharing(calibrated, preset)
            if quantity == "shared-core slowdown"
            else reset_quantities(calibrated, preset, [quantity])
        )
    columns = {}
    for source in ("profile", "roofline"):
        plans_by_model, measured, profile_files = [], [], []
        for model, report in reports:
            profile = OUT / f"profile_{label_of(model)}.json"
            use = str(profile) if source == "profile" and profile.exists() else None
            if source == "profile" and use is None:
                print(f"{profile} is missing: the 'profile' columns use the roofline for {label_of(model)}")
            plans_by_model.append(
                plan_candidates(model, calibrated, GLOBAL_BATCH_SIZE, use, pinned=measured_constraints(report))
            )
            measured.append(measured_step_s(report))
            profile_files.append(use)
        columns[source] = {
            label: _errors(plans_by_model, measured, spec, profile_files) for label, spec in variants.items()
        }
    count = len(columns["profile"]["calibrated (as measured)"])
    print(
        f"\nprediction error of the {count} measured candidates of benchmarks/bench_local.py "
        f"(median / worst |pred - meas| / meas), each quantity set back to its preset value in turn"
    )
    print(f"{'cluster spec':<34} {'with profile':>16} {'change':>8} {'roofline':>16} {'change':>8}")
    base = {source: statistics.median(columns[source]["calibrated (as measured)"]) for source in columns}
    for label in variants:
        cells = []
        for source in ("profile", "roofline"):
            errors = columns[source][label]
            median = statistics.median(errors)
            cells.append(f"{median:>7.0%} / {max(errors):>5.0%} {median - base[source]:>+8.0%}")
        print(f"{label:<34} {cells[0]} {cells[1]}")
    for model, _ in reports:
        profile = OUT / f"profile_{label_of(model)}.json"
        if profile.exists():
            ratio = roofline_over_profile(model, calibrated, str(profile))
            print(f"{label_of(model)}: layer time, calibrated roofline / profiled (micro-batch 2): {ratio:.2f}")


def roofline_over_profile(model: str, cluster: ClusterSpec, profile_file: str, micro_batch_size: int = 2) -> float:
    """The forward + backward seconds of `model`'s layers priced by `cluster`'s roofline over the
    same priced from `profile_file`'s measured times (one rank, no tp or recompute, float32): the
    share of a layer's measured time the calibrated rates explain."""
    from autoplan.costmodels.compute import estimate_layer_time

    totals = []
    for profile in (
        model_profile(model, cluster, GLOBAL_BATCH_SIZE, None),
        model_profile(model, cluster, GLOBAL_BATCH_SIZE, profile_file),
    ):
        times = [
            estimate_layer_time(
                layer,
                cluster.device,
                micro_batch_size=micro_batch_size,
                tp=1,
                sequence_parallel=False,
                recompute="none",
                compute_dtype="float32",
            )
            for layer in profile.layers
        ]
        totals.append(sum(t.forward_s + t.backward_s for t in times))
    return totals[0] / totals[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clusters", nargs=2, default=None, help="two calibrated local:4 files (default: calibrate twice now)"
    )
    parser.add_argument("--ablate", action="store_true", help="the constant-by-constant ablation (module docstring)")
    parser.add_argument(
        "--cluster",
        default=str(OUT / "local4.calibrated.toml"),
        help="with --ablate: the calibrated file the bench used",
    )
    args = parser.parse_args()
    if args.ablate:
        ablate(args.cluster)
    else:
        repeat(args.clusters)


if __name__ == "__main__":
    main()
