"""The residuals of costmodels/uncertainty.py, recomputed from the rows that give them.

    python benchmarks/residuals.py                          # "cuda": Megatron SC21 + torchtitan H100
    python benchmarks/residuals.py --local benchmarks/out   # "cpu" too, from bench_local.py's reports

A residual is (predicted - true) / true for one row:
    Megatron SC21 (benchmarks/megatron_sc21.py, Tables 1 and 2, pinned): step time only (no
        memory is published); TFLOP/s goes as 1 / step time, so the step residual is
        published TFLOP/s / predicted TFLOP/s - 1.
    torchtitan H100 (benchmarks/torchtitan_h100.py, every expressible row, eager and
        compiled): predicted / published step time - 1 and predicted / published peak - 1.
    bench_local.py (its bench_<model>.json reports, in --local): per candidate that ran,
        predicted / measured step time - 1 and predicted / measured worst-rank peak - 1.
Every row is evaluated on its point estimate (no memory margin): a margin must not refuse
the rows it is computed from. Prints each row's residuals, then the `RESIDUALS` entries to
paste into costmodels/uncertainty.py, each extreme naming its row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from autoplan.costmodels.uncertainty import point_estimates
from autoplan.errors import AutoplanError

HERE = Path(__file__).resolve().parent


def _benchmark(name: str):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def megatron_rows() -> list[dict]:
    """Per Table 1 and Table 2 row: its label and step-time residual (None: refused)."""
    megatron = _benchmark("megatron_sc21")
    data = json.loads(megatron.reference_path().read_text())
    rows = []
    for row in data["table1_weak_scaling"]:
        predicted = megatron.evaluate_table1_row(row)["tflops"]
        rows.append({"row": f"Table 1 {row['params_b']:g}B {row['gpus']} GPUs", "step": row["tflops"] / predicted - 1})
    for row in data["table2_ptdp_vs_zero3"]["rows"]:
        label = f"Table 2 {row['scheme']} {row['params_b']:g}B {row['gpus']} GPUs"
        try:
            rows.append({"row": label, "step": row["tflops"] / megatron.evaluate_table2_row(row) - 1})
        except AutoplanError as error:
            rows.append({"row": label, "refused": " ".join(str(error).split())[:120]})
    return [{"set": "megatron_sc21.py", **row} for row in rows]


def torchtitan_rows() -> list[dict]:
    """Per expressible torchtitan row: its id, step-time and peak-memory residuals."""
    titan = _benchmark("torchtitan_h100")
    rows = []
    for run in titan.load_runs():
        if titan.row_class(run) == "skipped":
            continue
        result = titan.evaluate_row(run)
        row = {"set": "torchtitan_h100.py", "row": result["id"]}
        if "refused" in result:
            rows.append({**row, "refused": result["refused"][:120]})
            continue
        step = result["predicted_step_s"] / result["published_step_s"] - 1
        rows.append({**row, "step": step, "memory": result["memory_error"]})
    return rows


def local_rows(folder: Path) -> list[dict]:
    """Per candidate that ran in each bench_<model>.json of `folder`: step and memory residuals."""
    from autoplan.bench.compare import relative_error

    rows = []
    for path in sorted(folder.glob("bench_*.json")):
        for candidate in json.loads(path.read_text())["candidates"]:
            if not candidate["measured_step_s"]:
                continue
            rows.append(
                {
                    "set": path.name,
                    "row": candidate["name"],
                    "step": relative_error(candidate["predicted_step_s"], candidate["measured_step_s"]),
                    "memory": relative_error(
                        candidate["predicted_peak_memory_bytes"], candidate["measured_peak_memory_bytes"]
                    ),
                }
            )
    return rows


def extremes(rows: list[dict], key: str) -> tuple[dict, dict] | None:
    """The rows with the lowest and the highest residual `key` (None: no row has one)."""
    present = [row for row in rows if row.get(key) is not None]
    if not present:
        return None
    return min(present, key=lambda row: row[key]), max(present, key=lambda row: row[key])


def entry(kind: str, rows: list[dict], source: str) -> str:
    """The `RESIDUALS[kind]` entry, as Python source, each extreme commented with its row."""
    lines = [f'    "{kind}": Residuals(']
    counts = {key: sum(row.get(key) is not None for row in rows) for key in ("step", "memory")}
    lines.append(
        f"        # python benchmarks/residuals.py: {counts['step']} step-time, {counts['memory']} memory rows"
    )
    for key, name in (("step", "step_time"), ("memory", "memory")):
        pair = extremes(rows, key)
        if pair is None:
            lines.append(f"        # {name}: no row has one")
            continue
        for side, row in zip(("low", "high"), pair):
            lines.append(f"        {name}_{side}={row[key]:+.4f},  # {row['set']} {row['row']}")
    lines += [f'        source="{source}",', "    ),"]
    return "\n".join(lines)


def print_rows(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Residuals (predicted - true) / true, per row")
    for column in ("set", "row", "step time", "peak memory"):
        table.add_column(column, justify="right" if column in ("step time", "peak memory") else "left")
    for row in rows:
        shown = [f"{row[k]:+.1%}" if row.get(k) is not None else "-" for k in ("step", "memory")]
        if "refused" in row:
            shown = ["refused", row["refused"][:60]]
        table.add_row(row["set"], row["row"], *shown)
    Console(width=150).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", type=Path, help="a folder of bench_local.py reports (bench_*.json)")
    args = parser.parse_args(argv)
    with point_estimates():
        cuda = megatron_rows() + torchtitan_rows()
        cpu = local_rows(args.local) if args.local else []
    print_rows(cuda + cpu)
    print("RESIDUALS entries for costmodels/uncertainty.py:")
    print(entry("cuda", cuda, "Megatron SC21 and torchtitan H100 rows (benchmarks/residuals.py)"))
    if args.local:
        print(entry("cpu", cpu, f"bench_local.py on local:4 (benchmarks/residuals.py --local {args.local})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
