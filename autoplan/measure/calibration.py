"""What `autoplan.measure.calibrate` measured, the fits of its collective timings, and how
the measurements become a ClusterSpec's figures (`Calibration.apply`; the rules are in
`autoplan.measure.calibrate`'s docstring).

    >>> ring_terms("all_gather", 4)
    (3, 0.75)

Kept apart from the measuring: a Calibration is plain data plus arithmetic, so the fits and
`apply` can be checked on made-up timings without spawning a rank.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field

import torch

from autoplan.measure.probes import BLOCK_PROBE, HOST_PROBE
from autoplan.schema.cluster import ClusterSpec

COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")

CONSTANT_GROUPS: dict[str, tuple[str, ...]] = {
    "matmul rate": ("device.peak_flops", "device.matmul_efficiency"),
    "per-op host work": ("device.op_overhead_us",),
    "elementwise bandwidth": ("device.memory_bandwidth_gbps", "device.memory_efficiency"),
    "AdamW traffic": ("device.adam_bytes_per_param",),
    "shared-core slowdown": ("device.shared_core_slowdown",),
    "DTensor dispatch": ("device.tp_dispatch_overhead_us",),
    "DTensor optimizer step": ("device.dtensor_param_step_us",),
    "link bandwidth": ("intra_node.bandwidth_gbps", "inter_node.bandwidth_gbps"),
    "link latency": ("intra_node.latency_us", "inter_node.latency_us"),
    "collective overhead": ("intra_node.collective_overhead_us", "inter_node.collective_overhead_us"),
    "pipeline send overhead": ("intra_node.p2p_overhead_us", "inter_node.p2p_overhead_us"),
}
"""The physical quantities calibration measures, each with the ClusterSpec fields it writes
(`costmodels.devices.CALIBRATED_CONSTANTS` lists the fields with their preset sources). A
quantity is kept or reset as a whole: peak FLOP/s and matmul efficiency only mean something
as their product, the rate a matmul reaches."""

RELATIVE_BOUNDS: dict[str, tuple[float, float]] = {
    "matmul rate": (0.25, 4.0),
    "elementwise bandwidth": (0.25, 8.0),
    "AdamW traffic": (0.25, 4.0),
    "shared-core slowdown": (0.9, 1.5),
    "DTensor dispatch": (0.25, 4.0),
    "DTensor optimizer step": (0.25, 4.0),
    "link bandwidth": (0.1, 10.0),
    "link latency": (0.0, 40.0),
}
"""Sanity bounds of a measured quantity (`quantity_value`) as multiples of the preset's:
outside them the measurement says more about what else ran on the machine than about the
machine, and `Calibration.apply` keeps the preset's value (saying so). They are wide on
purpose, far beyond the scatter of repeated calibrations, so they catch only a broken
measurement: a datasheet or core-count guess is rarely off by 4x, and the shared-core
slowdown of N ranks on C cores cannot be below N / C (every rank computing) nor, with
nothing else running, much above it (1.5x: the ranks also share the caches and memory
bus). A preset value of 0 (GPU presets: no host overheads) bounds nothing. The per-call
overheads under load have no preset to compare with; they are bounded by the probe's
compute between two calls (`Calibration.loaded_round_us`): a rank cannot wait longer for
its peers than their work between the calls takes, unless other processes hold the cores."""

BUSY_MACHINE_CORES = 0.25
"""Cores other processes may use while calibrating before the result warns that it describes
a loaded machine (`Calibration.background_cores`)."""


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
    """One AdamW step's seconds per float32 parameter, timed as `elementwise_gbps` is."""
    loaded_p2p_extra_us: float | None = None
    """Time a ring exchange (receive posted ahead) between MLP steps adds per round (CPU, several ranks)."""
    tp_dispatch_s: float | None = None
    """Host seconds DTensor adds per tensor-parallel site and micro-batch (CPU, several ranks)."""
    dtensor_param_step_s: float | None = None
    """Host seconds an AdamW step adds per DTensor parameter (CPU, several ranks)."""
    block_s: list[tuple[int, float]] = field(default_factory=list)
    """(width, seconds) of the layer probe's transformer block forward + backward (probes.BLOCK_PROBE),
    timed like matmul_flops; empty on a GPU."""
    host_block_s: float | None = None
    """Seconds of the host probe's forward + backward (probes.HOST_PROBE), timed like block_s;
    None on a GPU."""
    loaded_round_us: float | None = None
    """One round of the loaded-overhead probes without their collective: the compute between
    two calls, all ranks busy (bounds the per-call overheads, RELATIVE_BOUNDS)."""
    background_cores: float | None = None
    """Cores other processes kept busy while this ran (None where /proc/stat is unreadable)."""
    wall_s: float = 0.0
    kept_preset: dict[str, str] = field(default_factory=dict)
    """Quantity (CONSTANT_GROUPS) -> why its measurement was implausible and the preset kept;
    filled by `apply`."""

    def large_matmul_flops(self, dtype: str) -> tuple[int, float]:
        """(n, FLOP/s) of the largest size measured for `dtype`."""
        return self.matmul_flops[dtype][-1]

    def saturated_flops(self, dtype: str, device) -> float:
        """The saturated rate of the cost model's curve `A * F / (F + H)` (H: `device`'s
        matmul_half_efficiency_flops) that reproduces the measurements. On a GPU: solved at
        the largest size (CUDA events time the device alone). On CPU ranks, whose timings a
        scheduler interrupts: solved at each size measured, the median of those, so one
        size's timing disturbed by another process (or a size past the caches) moves it by
        nothing."""
        from autoplan.costmodels.compute import matmul_efficiency

        unit = device.model_copy(update={"matmul_efficiency": 1.0})
        points = self.matmul_flops[dtype] if self.device == "cpu" else self.matmul_flops[dtype][-1:]
        return statistics.median(achieved / matmul_efficiency(2 * n**3, unit) for n, achieved in points)

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

    def layer_fit(self, device) -> tuple[float, float] | None:
        """(saturated matmul rate, host seconds per dispatched op) with which the cost model's
        roofline (`estimate_layer_time` on `device`, at the measured elementwise bandwidth)
        reproduces the probes: `t = M / R + E + N * c`, M the block's matmul seconds at 1 FLOP/s,
        E its elementwise seconds, N its ops. The host probe (arithmetic ~3% of its time) fixes
        c, then each width of the layer probe a rate, the median; the host probe's own
        arithmetic is taken out at that rate (a few passes). No host probe: c = 0. None without a
        layer probe or where the probe's elementwise and host work alone take longer than measured."""
        if not self.block_s or not self.elementwise_gbps:
            return None
        rows = [(*_probe_terms(width, device, self.elementwise_gbps), seconds) for width, seconds in self.block_s]
        host_s = self.host_block_s
        host = _probe_terms(HOST_PROBE[3][0], device, self.elementwise_gbps, HOST_PROBE) if host_s else None

        def fit(rate: float) -> tuple[float, float] | None:
            op_s = 0.0
            if host is not None and host_s:
                matmul, elementwise, ops = host
                op_s = max(0.0, (host_s - elementwise - matmul / rate) / ops)
            rates = [m / (t - e - n * op_s) for m, e, n, t in rows if t - e - n * op_s > 0]
            return (statistics.median(rates), op_s) if rates else None

        fitted = fit(math.inf)
        for _ in range(5):  # each pass takes out the host probe's arithmetic (~3%) more exactly
            fitted = fit(fitted[0]) if fitted is not None else None
        return fitted

    def apply(self, cluster: ClusterSpec) -> ClusterSpec:
        """A copy of `cluster` carrying these measurements, `calibrated=True` (the rules are in
        `autoplan.measure.calibrate`'s docstring). A quantity whose measurement falls outside
        its sanity bounds (RELATIVE_BOUNDS) keeps `cluster`'s value; `kept_preset` says which and why."""
        # the slowdown first: the rates timed alone are divided by it
        slowdown, reasons = max(1.0, self.shared_core_slowdown), {}
        low, high = RELATIVE_BOUNDS["shared-core slowdown"]
        reference = cluster.device.shared_core_slowdown
        if not low * reference <= slowdown <= high * reference:
            reasons["shared-core slowdown"] = (
                f"measured {slowdown:.3g}, outside {low:g}-{high:g} x the preset's {reference:.3g}"
            )
            slowdown = reference
        measured = self._measured(cluster, slowdown)
        self.kept_preset = {**reasons, **implausible(measured, cluster, self.loaded_round_us)}
        return reset_quantities(measured, cluster, self.kept_preset)

    def _measured(self, cluster: ClusterSpec, slowdown: float) -> ClusterSpec:
        """`cluster` with every measured figure written (`slowdown` for shared_core_slowdown),
        before the sanity bounds."""
        from autoplan.costmodels.communication import LINK_EFFICIENCY

        data = cluster.model_dump()
        device = data["device"]
        # The cost model's rate for an F-FLOP matmul is peak * matmul_efficiency(F), a curve
        # that saturates at device.matmul_efficiency; solve for the saturated rate that
        # gives the measured rates at the measured sizes.
        share = slowdown if self.rates_alone else 1.0
        elementwise_gbps = self.elementwise_gbps / share
        saturated = {dtype: self.saturated_flops(dtype, cluster.device) / share for dtype in self.matmul_flops}
        layer_fit = self.layer_fit(cluster.device)
        if layer_fit is not None:  # a layer's matmuls run inside autograd, beside attention's small ones
            layer_rate, op_s = layer_fit
            scale = layer_rate / share / saturated["float32"]
            saturated = {dtype: rate * scale for dtype, rate in saturated.items()}
            device["op_overhead_us"] = op_s * share * 1e6
        efficiency = min(1.0, saturated["float32"] / device["peak_flops"]["float32"])
        device["matmul_efficiency"] = efficiency
        device["peak_flops"] = {
            **device["peak_flops"],
            **{dtype: rate / efficiency for dtype, rate in saturated.items()},
        }
        memory_efficiency = min(1.0, elementwise_gbps / device["memory_bandwidth_gbps"])
        device["memory_efficiency"] = memory_efficiency
        device["memory_bandwidth_gbps"] = elementwise_gbps / memory_efficiency
        if self.adam_seconds_per_param:  # timed as the elementwise bandwidth: bytes, whatever the sharing
            device["adam_bytes_per_param"] = self.adam_seconds_per_param * self.elementwise_gbps * 1e9
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
        device["shared_core_slowdown"] = slowdown
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
        who = "rank 0 alone" if self.rates_alone else "per rank"
        table.add_column("measured")
        table.add_column("value", justify="right")
        for dtype, points in self.matmul_flops.items():
            curve = ", ".join(f"{n}: {flops / 1e9:.3g}" for n, flops in points)
            table.add_row(f"matmul {dtype} GFLOP/s, {who} (n: value)", curve)
        table.add_row("matmul FLOPs at half rate (float32 fit)", f"{self.half_efficiency_flops():.3g}")
        if self.block_s:
            blocks = ", ".join(f"{width}: {seconds * 1e3:.3g}" for width, seconds in self.block_s)
            table.add_row(f"transformer block forward + backward ms, {who} (width: value)", blocks)
            if self.host_block_s:
                table.add_row(f"host probe block forward + backward ms, {who}", f"{self.host_block_s * 1e3:.3g}")
            rate_and_host = self.layer_fit(ClusterSpec.local(self.nproc).device)
            if rate_and_host is not None:
                rate, op_s = rate_and_host
                table.add_row(
                    f"block fit: matmul GFLOP/s / host us per op, {who}", f"{rate / 1e9:.3g} / {op_s * 1e6:.3g}"
                )
        table.add_row(f"elementwise GB/s, {who}", f"{self.elementwise_gbps:.3g}")
        if self.adam_seconds_per_param:
            table.add_row(
                "AdamW ns per parameter (bytes moved per parameter)",
                f"{self.adam_seconds_per_param * 1e9:.3g} "
                f"({self.adam_seconds_per_param * self.elementwise_gbps * 1e9:.3g})",
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
        if self.background_cores is not None:
            table.add_row("cores other processes kept busy meanwhile", f"{self.background_cores:.2f}")
        for quantity, why in self.kept_preset.items():
            table.add_row(f"{quantity}: preset kept", why)
        return table

    def warnings(self) -> list[str]:
        """What the person calibrating should know: a loaded machine, preset values kept."""
        lines = []
        if self.background_cores is not None and self.background_cores > BUSY_MACHINE_CORES:
            lines.append(
                f"other processes kept {self.background_cores:.2f} cores busy while calibrating: the "
                "rates and per-call costs describe a loaded machine; calibrate again when it is idle"
            )
        lines += [f"{quantity}: {why}; the preset's value is kept" for quantity, why in self.kept_preset.items()]
        return lines


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


def quantity_value(cluster: ClusterSpec, quantity: str) -> float:
    """The number a quantity of CONSTANT_GROUPS comes to in `cluster`: the float32 matmul rate
    (peak x efficiency), the elementwise bandwidth (GB/s x efficiency), else its first field.

    >>> round(quantity_value(ClusterSpec.preset("dgx-a100-80gb"), "matmul rate") / 1e12, 2)   # 19.5 x 0.7
    13.65
    """
    device = cluster.device
    if quantity == "matmul rate":
        return device.peak_flops["float32"] * device.matmul_efficiency
    if quantity == "elementwise bandwidth":
        return device.memory_bandwidth_gbps * device.memory_efficiency
    section, name = CONSTANT_GROUPS[quantity][0].split(".")
    return float(cluster.model_dump()[section][name])


def implausible(measured: ClusterSpec, preset: ClusterSpec, loaded_round_us: float | None) -> dict[str, str]:
    """Quantity -> why, for each measured quantity outside its sanity bounds (RELATIVE_BOUNDS)."""
    reasons = {}
    for quantity, (low, high) in RELATIVE_BOUNDS.items():
        value, reference = quantity_value(measured, quantity), quantity_value(preset, quantity)
        if reference > 0 and not low * reference <= value <= high * reference:
            reasons[quantity] = f"measured {value:.3g}, outside {low:g}-{high:g} x the preset's {reference:.3g}"
    if loaded_round_us:
        for quantity in ("collective overhead", "pipeline send overhead"):
            value = quantity_value(measured, quantity)
            if value > loaded_round_us:
                reasons[quantity] = (
                    f"measured {value:.3g} us, longer than the probe's compute between two calls "
                    f"({loaded_round_us:.3g} us): other processes held the cores"
                )
    return reasons


def reset_quantities(cluster: ClusterSpec, preset: ClusterSpec, quantities) -> ClusterSpec:
    """`cluster` with the fields of each quantity of CONSTANT_GROUPS in `quantities` set back to
    `preset`'s (what `apply` does with an implausible one, and the ablation of
    benchmarks/calibration_repeat.py with each in turn)."""
    data, reference = cluster.model_dump(), preset.model_dump()
    for quantity in quantities:
        for path in CONSTANT_GROUPS[quantity]:
            section, name = path.split(".")
            data[section][name] = reference[section][name]
    return ClusterSpec.model_validate(data)


def _probe_terms(width: int, device, elementwise_gbps: float, probe: tuple = BLOCK_PROBE) -> tuple[float, float, int]:
    """(matmul seconds at 1 FLOP/s, elementwise seconds at `elementwise_gbps`, ops dispatched)
    of `probe`'s block at `width`, forward + backward, as `estimate_layer_time` prices it."""
    from autoplan.costmodels.compute import estimate_layer_time

    layer = _probe_layer(width, probe)
    unit = {"matmul_efficiency": 1.0, "memory_efficiency": 1.0, "op_overhead_us": 0.0}
    matmul_only = {**unit, "peak_flops": {"float32": 1.0}, "memory_bandwidth_gbps": 1e30}
    memory_only = {**unit, "peak_flops": {"float32": 1e30}, "memory_bandwidth_gbps": elementwise_gbps}
    matmul_s, elementwise_s = (
        estimate_layer_time(
            layer,
            device.model_copy(update=update),
            micro_batch_size=probe[0],
            tp=1,
            sequence_parallel=False,
            recompute="none",
            compute_dtype="float32",
        ).total_s
        for update in (matmul_only, memory_only)
    )
    return matmul_s, elementwise_s, layer.forward_ops + layer.backward_ops


@functools.lru_cache(maxsize=8)
def _probe_layer(width: int, probe: tuple = BLOCK_PROBE):
    """The planner's LayerProfile of `probe`'s block at `width` (one sequence), profiled on meta."""
    from autoplan.analysis.profile import profile_model
    from autoplan.measure.probes import probe_block
    from autoplan.zoo import language_model_loss
    from autoplan.zoo.gpt import GPT

    _, config = probe_block(width, probe)
    with torch.device("meta"):
        model = GPT(config)
    tokens = torch.zeros(1, probe[1], dtype=torch.long, device="meta")
    profile = profile_model(model, (tokens,), model_name=f"probe-block-{width}", loss_fn=language_model_loss)
    return next(layer for layer in profile.layers if layer.name.endswith("blocks.0"))
