"""The cost model's constants that calibration replaces: preset value, source, and the value
measured on this machine.

    python benchmarks/constants.py                                    # calibrates local:4 (~30 s)
    python benchmarks/constants.py --cluster benchmarks/out/local4.calibrated.toml

The list is `costmodels.devices.CALIBRATED_CONSTANTS`; docs/cost_model.md quotes this output.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from autoplan import ClusterSpec
from autoplan.costmodels.devices import CALIBRATED_CONSTANTS
from autoplan.measure.calibrate import calibrate


def field_value(cluster: ClusterSpec, path: str):
    """The value at a dotted ClusterSpec field path ("device.peak_flops.float32")."""
    value = cluster.model_dump()
    for part in path.split("."):
        value = value[part]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default=None, help="a calibrated local:4 file (default: calibrate now)")
    args = parser.parse_args()
    preset = ClusterSpec.local(world_size=4)
    calibrated = ClusterSpec.from_file(args.cluster) if args.cluster else calibrate(preset)
    gpu = ClusterSpec.preset("dgx-a100-80gb")
    table = Table(title="cost-model constants: preset vs calibrated on this machine (local:4)")
    for column in ("constant", "dgx-a100-80gb", "local:4 preset", "local:4 calibrated", "preset source"):
        table.add_column(column, justify="left" if column in ("constant", "preset source") else "right")
    for path, source in CALIBRATED_CONSTANTS.items():
        table.add_row(path, *(f"{field_value(c, path):.4g}" for c in (gpu, preset, calibrated)), source)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


if __name__ == "__main__":
    main()
