"""How far the cost model's predictions have been from the truth, and the intervals that follow.

A residual is a relative error as the benchmarks print it, (predicted - true) / true, where
"true" is a published figure (the reference sets) or a measured one (the local bench). Per
device kind, `RESIDUALS` holds the lowest and highest residual of step time and of peak
memory over that kind's reference rows. Given a prediction p, the true value t = p / (1 + e)
for some e in [low, high], so

    step time:    t in [p / (1 + high), p / (1 + low)]     (`step_time_interval_s`)
    peak memory:  t <= p / (1 + low) = p * (1 + margin),   margin = 1 / (1 + low) - 1
                  (`memory_margin`; 0 where the model never under-predicted)

The planner calls a plan feasible only when its memory upper bound fits the cap: the MILP's
cap is `usable_memory_bytes(cap)` = cap / (1 + margin) (autoplan.planner.instance).

Regenerating: the GPU cost model is being changed (issue 14, item 2), so the "cuda" figures
move with it. `python benchmarks/residuals.py` re-evaluates the rows of
benchmarks/megatron_sc21.py and benchmarks/torchtitan_h100.py and prints the "cuda" entry
to paste here; `--local benchmarks/out` adds the "cpu" entry from the per-candidate
predicted and measured figures of benchmarks/bench_local.py's reports.

    >>> low, high = step_time_interval_s(1.0, "cuda")
    >>> low < 1.0 < high
    True
    >>> peak_memory_upper_bytes(1e9, "cuda") >= 1e9
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Residuals:
    """The lowest and highest (predicted - true) / true of one device kind's reference rows."""

    step_time_low: float
    step_time_high: float
    memory_low: float
    memory_high: float
    source: str
    """Which rows the figures come from, and the script that printed them."""


RESIDUALS: dict[str, Residuals] = {
    "cuda": Residuals(
        # python benchmarks/residuals.py (2026-12-07, attention priced as the fused kernel runs
        # it): 29 step-time, 4 memory rows
        step_time_low=-0.1185,  # torchtitan_h100.py h100_2506_asynctp_8b_64gpu_bf16_vanillatp
        step_time_high=+0.2620,  # torchtitan_h100.py h100_2412_T3_8b_128gpu_fsdp_compile
        memory_low=-0.0467,  # torchtitan_h100.py h100_2412_T3_8b_128gpu_fsdp
        memory_high=+0.0507,  # torchtitan_h100.py h100_2412_T1_8b_8gpu_fsdp_compile
        source="Megatron SC21 and torchtitan H100 rows (benchmarks/residuals.py)",
    ),
    "cpu": Residuals(
        # python benchmarks/residuals.py --local over three `bench_local.py` runs (2026-12-07
        # afternoon, each after its own calibration; the README's table): 30 step-time, 30 memory rows
        step_time_low=-0.2324,  # run 3, gpt-small-demo megatron
        step_time_high=+0.2915,  # run 2, custom_model autoplan
        memory_low=-0.1251,  # run 1, gpt-small-demo megatron (97.2 MB predicted, 111.1 measured)
        memory_high=+0.2416,  # run 1, custom_model fsdp (13.1 MB predicted, 10.5 measured)
        source="bench_local.py on local:4, three runs (benchmarks/residuals.py --local)",
    ),
}


def residuals_of(kind: str) -> Residuals:
    """The residuals of device kind `kind` ("cuda" or "cpu"); ValueError for another.

    >>> residuals_of("cpu").step_time_high
    0.2915
    """
    if kind not in RESIDUALS:
        raise ValueError(f"device kind {kind!r} has no calibration residuals; known: {sorted(RESIDUALS)}")
    return RESIDUALS[kind]


def step_time_interval_s(step_time_s: float, kind: str) -> tuple[float, float]:
    """Where the true step time lies given the predicted `step_time_s`, seconds.

    >>> [round(t, 3) for t in step_time_interval_s(1.0, "cpu")]
    [0.774, 1.303]
    """
    residuals = residuals_of(kind)
    return step_time_s / (1 + residuals.step_time_high), step_time_s / (1 + residuals.step_time_low)


def memory_margin(kind: str) -> float:
    """The share the true peak memory may exceed the predicted one by: 1 / (1 + memory_low) - 1.

    >>> round(memory_margin("cpu"), 3)
    0.143
    """
    return max(0.0, 1 / (1 + residuals_of(kind).memory_low) - 1)


def peak_memory_upper_bytes(peak_memory_bytes: float, kind: str) -> float:
    """The upper bound on the true peak memory given the predicted `peak_memory_bytes`.

    >>> round(peak_memory_upper_bytes(100e6, "cpu") / 1e6, 1)
    114.3
    """
    return peak_memory_bytes * (1 + memory_margin(kind))


def usable_memory_bytes(cap_bytes: float, kind: str) -> float:
    """The largest predicted peak whose upper bound fits `cap_bytes`: cap / (1 + margin).

    >>> round(usable_memory_bytes(114.3e6, "cpu") / 1e6, 1)
    100.0
    """
    return cap_bytes / (1 + memory_margin(kind))


@contextlib.contextmanager
def point_estimates() -> Iterator[None]:
    """Within the block every residual is 0: no interval and no memory margin. For evaluating
    reference rows (benchmarks/residuals.py), which a margin must not refuse: the residuals are
    computed from them.

    >>> with point_estimates():
    ...     memory_margin("cuda")
    0.0
    """
    saved = dict(RESIDUALS)
    RESIDUALS.update({kind: Residuals(0.0, 0.0, 0.0, 0.0, "point estimate") for kind in saved})
    try:
        yield
    finally:
        RESIDUALS.update(saved)
