"""What `autoplan.measure.calibrate` measured, the fits of its collective timings, and how
the measurements become a ClusterSpec's figures (`Calibration.apply`; the rules are in
`autoplan.measure.calibrate`'s docstring).

    >>> ring_terms("all_gather", 4)
    (3, 0.75)

Kept apart from the measuring: a Calibration is plain data plus arithmetic, so the fits and
`apply` can be checked on made-up timings without spawning a rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autoplan.schema.cluster import ClusterSpec

COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@dataclass
class CollectiveFit:
    """`t = steps * latency + factor * S / bandwidth` fitted to one collective's timings."""

    name: str
    latency_us: float
    """Per-message latency, microseconds."""
    bandwidth_gbps: float
    """Per-device one-direction link bandwidth, GB/s."""
    points: list[tuple[int, float]]
    """(message bytes S, median seconds) as measured."""


@dataclass
class Calibration:
    """Everything `calibrate` measured, and how it maps onto a ClusterSpec."""

    device: str
    nproc: int
    matmul_flops: dict[str, list[tuple[int, float]]]
    """dtype -> [(n, achieved FLOP/s of an n x n x n matmul)], median over ranks."""
    elementwise_gbps: float
    """Achieved bandwidth of `a + b` (bytes read and written / s / 1e9), median over ranks."""
    collectives: dict[str, CollectiveFit] = field(default_factory=dict)
    link: CollectiveFit | None = None
    """The joint fit of all collectives; None with one rank."""
    shared_core_slowdown: float = 1.0
    """All-busy over alone time of the probe MLP step (CPU, several ranks)."""
    rates_alone: bool = False
    """matmul_flops and elementwise_gbps were timed on one rank alone (CPU, several ranks):
    `apply` divides them by shared_core_slowdown."""
    loaded_extra_us: float | None = None
    """Time a 1 KiB all-reduce issued between MLP steps adds per round (CPU, several ranks)."""
    adam_seconds_per_param: float | None = None
    """One AdamW step's seconds per float32 parameter, median over ranks."""
    loaded_p2p_extra_us: float | None = None
    """Time a ring exchange (receive posted ahead) between MLP steps adds per round (CPU, several ranks)."""
    tp_dispatch_s: float | None = None
    """Host seconds DTensor adds per tensor-parallel site and micro-batch (CPU, several ranks)."""
    dtensor_param_step_s: float | None = None
    """Host seconds an AdamW step adds per DTensor parameter (CPU, several ranks)."""
    wall_s: float = 0.0

    def large_matmul_flops(self, dtype: str) -> tuple[int, float]:
        """(n, FLOP/s) of the largest size measured for `dtype`."""
        return self.matmul_flops[dtype][-1]

    def half_efficiency_flops(self, dtype: str = "float32") -> float:
        """FLOPs per matmul at which this device reaches half its large-matmul rate, fitted
        as `1/achieved = 1/A + (H/A) * 1/F` (the cost model's curve `A * F / (F + H)`)."""
        points = self.matmul_flops[dtype]
        if len(points) < 2:
            return 0.0
        rows = torch.tensor([[1.0, 1.0 / (2 * n**3)] for n, _ in points], dtype=torch.float64)
        values = torch.tensor([[1.0 / flops] for _, flops in points], dtype=torch.float64)
        inverse_a, h_over_a = torch.linalg.lstsq(rows, values).solution.squeeze(1).tolist()
        return max(h_over_a / inverse_a, 0.0) if inverse_a > 0 else 0.0

    def apply(self, cluster: ClusterSpec) -> ClusterSpec:
        """A copy of `cluster` carrying these measurements, `calibrated=True` (the rules are in
        `autoplan.measure.calibrate`'s docstring)."""
        from autoplan.costmodels.communication import LINK_EFFICIENCY
        from autoplan.costmodels.compute import matmul_efficiency

        data = cluster.model_dump()
        device = data["device"]
        # The cost model's rate for an F-FLOP matmul is peak * matmul_efficiency(F), a curve
        # that saturates at device.matmul_efficiency; solve for the saturated rate that
        # gives the measured rate at the measured size.
        saturated = {}
        share = self.shared_core_slowdown if self.rates_alone else 1.0
        elementwise_gbps = self.elementwise_gbps / share
        for dtype in self.matmul_flops:
            n, achieved = self.large_matmul_flops(dtype)
            achieved /= share
            unit = cluster.device.model_copy(update={"matmul_efficiency": 1.0})
            saturated[dtype] = achieved / matmul_efficiency(2 * n**3, unit)
        efficiency = min(1.0, saturated["float32"] / device["peak_flops"]["float32"])
        device["matmul_efficiency"] = efficiency
        device["peak_flops"] = {
            **device["peak_flops"],
            **{dtype: rate / efficiency for dtype, rate in saturated.items()},
        }
        memory_efficiency = min(1.0, elementwise_gbps / device["memory_bandwidth_gbps"])
        device["memory_efficiency"] = memory_efficiency
        device["memory_bandwidth_gbps"] = elementwise_gbps / memory_efficiency
        if self.adam_seconds_per_param:  # timed on every rank at once: the all-busy bandwidth prices it
            device["adam_bytes_per_param"] = self.adam_seconds_per_param * elementwise_gbps * 1e9
        if self.link is not None:
            # the communication model uses bandwidth_gbps * LINK_EFFICIENCY as the achieved rate
            link = {
                "bandwidth_gbps": self.link.bandwidth_gbps / LINK_EFFICIENCY,
                "latency_us": self.link.latency_us,
                "collective_overhead_us": self.collective_overhead_us(),
                "p2p_overhead_us": self.p2p_overhead_us(),
            }
            data["intra_node"] = link
            if cluster.num_nodes == 1 or cluster.device.kind == "cpu":
                data["inter_node"] = dict(link)
        if self.tp_dispatch_s is not None:
            device["tp_dispatch_overhead_us"] = self.tp_dispatch_s * 1e6
        if self.dtensor_param_step_s is not None:
            device["dtensor_param_step_us"] = self.dtensor_param_step_s * 1e6
        device["shared_core_slowdown"] = max(1.0, self.shared_core_slowdown)
        data["calibrated"] = True
        return ClusterSpec.model_validate(data)

    def collective_overhead_us(self) -> float:
        """The loaded all-reduce's extra time beyond the fitted idle one (0 when not measured)."""
        if self.loaded_extra_us is None or self.link is None:
            return 0.0
        steps, _ = ring_terms("all_reduce", self.nproc)
        return max(0.0, self.loaded_extra_us - steps * self.link.latency_us)

    def p2p_overhead_us(self) -> float:
        """The loaded ring exchange's extra time beyond one fitted latency (0 when not measured)."""
        if self.loaded_p2p_extra_us is None or self.link is None:
            return 0.0
        return max(0.0, self.loaded_p2p_extra_us - self.link.latency_us)

    def table(self):
        """A rich Table of the measurements (what `autoplan calibrate` prints)."""
        from rich.table import Table

        table = Table(title=f"calibration: {self.nproc} {self.device} rank(s), {self.wall_s:.1f} s")
        share = self.shared_core_slowdown if self.rates_alone else 1.0
        who = "rank 0 alone" if self.rates_alone else "per rank"
        table.add_column("measured")
        table.add_column("value", justify="right")
        for dtype, points in self.matmul_flops.items():
            curve = ", ".join(f"{n}: {flops / 1e9:.3g}" for n, flops in points)
            table.add_row(f"matmul {dtype} GFLOP/s, {who} (n: value)", curve)
        table.add_row("matmul FLOPs at half rate (float32 fit)", f"{self.half_efficiency_flops():.3g}")
        table.add_row(f"elementwise GB/s, {who}", f"{self.elementwise_gbps:.3g}")
        if self.adam_seconds_per_param:
            table.add_row(
                "AdamW ns per parameter (bytes moved per parameter)",
                f"{self.adam_seconds_per_param * 1e9:.3g} "
                f"({self.adam_seconds_per_param * self.elementwise_gbps * 1e9 / share:.3g})",
            )
        if self.nproc > 1 and self.device == "cpu":
            table.add_row("shared-core slowdown (all ranks busy / one alone)", f"{self.shared_core_slowdown:.3g}")
            table.add_row("collective overhead under load, us", f"{self.collective_overhead_us():.3g}")
            table.add_row("pipeline send overhead under load, us", f"{self.p2p_overhead_us():.3g}")
            if self.tp_dispatch_s is not None:
                table.add_row("DTensor host time per tensor-parallel site, us", f"{self.tp_dispatch_s * 1e6:.3g}")
            if self.dtensor_param_step_s is not None:
                table.add_row("AdamW host time per DTensor parameter, us", f"{self.dtensor_param_step_s * 1e6:.3g}")
        for fit in [*self.collectives.values(), *([self.link] if self.link else [])]:
            table.add_row(
                f"{fit.name}: latency us / bandwidth GB/s", f"{fit.latency_us:.3g} / {fit.bandwidth_gbps:.3g}"
            )
        return table


def ring_terms(name: str, nproc: int) -> tuple[int, float]:
    """(messages per rank, bytes each rank sends per byte of S) of the ring algorithm.

    >>> ring_terms("all_reduce", 4)
    (6, 1.5)
    """
    if name == "all_reduce":
        return 2 * (nproc - 1), 2 * (nproc - 1) / nproc
    if name in ("all_gather", "reduce_scatter"):
        return nproc - 1, (nproc - 1) / nproc
    if name == "send_recv":
        return 1, 1.0
    raise ValueError(f"unknown collective {name!r}; use one of {list(COLLECTIVES)}")


def fit_collectives(timings: dict[str, list[tuple[int, float]]], nproc: int, label: str) -> CollectiveFit:
    """`t = steps * latency + factor * S / bandwidth` fitted to every (collective, S, t).

    The latency is the least-squares fit over all points weighted by 1/t (relative error,
    so the small messages fix it; clamped at 0). The bandwidth is then the large-message
    rate: over each collective's largest message, `sum factor * S / sum (t - steps * latency)`.
    A single fit would take it from the mid-size messages, which gloo moves from cache
    several times faster than the megabytes of a layer's gradients.

    >>> fit = fit_collectives({"send_recv": [(0, 1e-5), (10**9, 1e-5 + 1.0)]}, 2, "x")
    >>> round(fit.latency_us, 3), round(fit.bandwidth_gbps, 3)
    (10.0, 1.0)
    """
    rows, values, points = [], [], []
    for name, measured in timings.items():
        steps, factor = ring_terms(name, nproc)
        for size, seconds in measured:
            rows.append([steps / seconds, factor * size / seconds])
            values.append(1.0)
            points.append((size, seconds))
    solution = torch.linalg.lstsq(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    ).solution.squeeze(1)
    latency_s = max(solution[0].item(), 0.0)
    moved, spent = 0.0, 0.0
    for name, measured in timings.items():
        steps, factor = ring_terms(name, nproc)
        size, seconds = max(measured)
        moved += factor * size
        spent += max(seconds - steps * latency_s, seconds / 2)
    return CollectiveFit(
        name=label, latency_us=latency_s * 1e6, bandwidth_gbps=moved / spent / 1e9, points=sorted(points)
    )
