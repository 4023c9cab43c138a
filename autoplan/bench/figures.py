"""The bench's figure: predicted vs measured step time per candidate, and the chosen plan's
pipeline timeline beside it (`autoplan bench --plot`)."""

from __future__ import annotations

import os
from pathlib import Path

from autoplan.bench.timeline import plot_timeline


def plot_bench(report: dict, path: str | os.PathLike) -> None:
    """Predicted vs measured step time per candidate; beside it the chosen plan's pipeline
    timeline when it has pp > 1 (from its predicted stage times). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or autoplan[plot])") from None
    chosen = next((c for c in report["candidates"] if c["chosen"] and c["plan"]), None)
    timeline = chosen is not None and chosen["mesh"]["pp"] > 1
    figure, axes = plt.subplots(1, 2 if timeline else 1, figsize=(13 if timeline else 7, 4), squeeze=False)
    bars = axes[0][0]
    names = [c["name"] for c in report["candidates"]]
    positions = range(len(names))
    width = 0.4
    bars.bar(
        [p - width / 2 for p in positions],
        [c["predicted_step_s"] or 0 for c in report["candidates"]],
        width,
        label="predicted",
    )
    bars.bar(
        [p + width / 2 for p in positions],
        [c["measured_step_s"] or 0 for c in report["candidates"]],
        width,
        label="measured",
    )
    for position, candidate in zip(positions, report["candidates"]):
        if candidate["measured_step_s"] is None:  # say why the measured bar is missing
            bars.text(
                position + width / 2,
                0,
                candidate["status"].split(":")[0],
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=8,
            )
    bars.set_xticks(list(positions), names, rotation=20)
    bars.set_ylabel("step time (s)")
    bars.set_title(f"{report['model']} on {report['cluster']}")
    bars.legend()
    if timeline and chosen is not None:
        plot_timeline(axes[0][1], chosen)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
