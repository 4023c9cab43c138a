"""Measure this machine and write what was measured into a ClusterSpec.

    >>> cluster = calibrate(ClusterSpec.local(world_size=4))   # doctest: +SKIP
    >>> cluster.calibrated, cluster.device.peak_flops["float32"] * cluster.device.matmul_efficiency  # doctest: +SKIP
    (True, 60.2e9)

Every measurement runs on `nproc` real ranks (spawned processes on a gloo or NCCL process
group). GPU ranks time their own device at once. CPU ranks share the machine's cores, so
matmul and elementwise rates are timed on rank 0 alone and divided by the measured
`shared_core_slowdown` (below): the rates written are what a rank gets while every rank
computes, and a rank alone in a pipeline bubble runs that much faster. (Timing all ranks
at once instead flatters small matmuls, which finish inside one scheduler time slice.)

What is measured, and how it becomes cost-model constants:

* Matmul throughput per dtype, `C = A @ B` of square n x n matrices for growing n (F = 2 n^3
  FLOP each). The cost model prices F FLOPs at `peak_flops[dtype] * matmul_efficiency *
  F / (F + device.matmul_half_efficiency_flops)` (costmodels/compute.py). Calibration takes the
  large-matmul point (n, achieved) (the largest size measured) and solves for
  the saturated rate `R[dtype] = achieved / (F / (F + device.matmul_half_efficiency_flops))` through
  that same function, so the cost model reproduces the measured rate at that size; then
  `matmul_efficiency = min(1, R[float32] / preset peak_flops[float32])` and
  `peak_flops[dtype] = R[dtype] / matmul_efficiency` for every measured dtype. The float32
  peak keeps its datasheet value unless the machine beats it, so MFU stays relative to
  the datasheet. The fitted half-rate FLOPs of this device is reported beside it.
* Elementwise bandwidth: `c = a + b` over large float32 tensors moves 3 x 4 bytes per
  element. The same rule: `memory_efficiency = min(1, measured / preset bandwidth)`,
  `memory_bandwidth_gbps = measured / memory_efficiency`.
* Adam: one `torch.optim.AdamW` step over ADAM_PARAMS float32 parameters on every rank
  at once; `adam_bytes_per_param = seconds per parameter * measured elementwise bandwidth`,
  the traffic the cost model then charges per parameter (28 for a fused GPU kernel).
* Collectives (all-reduce, all-gather, reduce-scatter, send/recv) over message sizes S
  (the full tensor: all-reduce input, all-gather output, reduce-scatter input). The ring
  algorithm on n ranks sends `steps` messages carrying `factor * S` bytes per rank:
  all-reduce steps = 2(n-1), factor = 2(n-1)/n; all-gather and reduce-scatter steps =
  n-1, factor = (n-1)/n; send-recv steps = 1, factor = 1. So
  `t = steps * latency + factor * S / bandwidth`, with `bandwidth` the per-device,
  one-direction link bandwidth the cluster spec means (written divided by the
  communication model's LINK_EFFICIENCY, which it multiplies back). Each collective gets its own
  least-squares fit (reported); the link written into the spec is the one fit of all
  collectives together (both fits weight each point by 1/t, i.e. minimise relative
  error, so small messages fix the latency and large ones the bandwidth).

* Sharing cores (CPU, several ranks): an MLP's forward + backward (a layer's mix of
  matmuls and elementwise work) timed on rank 0 alone and on every rank at once;
  `device.shared_core_slowdown` = all-busy time / alone time (1 when every rank has a core).
* Collective overhead under load (CPU): ranks alternate a smaller MLP step and a 1 KiB
  all-reduce; the time per round beyond the MLP steps alone, less the fitted all-reduce
  time, is `collective_overhead_us`: with more ranks than cores a collective waits for
  its peers to be scheduled, which an idle ping-pong never shows.
* Pipeline send overhead under load (CPU): the same rounds with a ring exchange instead
  (each rank's receive posted before its MLP step, as pipeline schedules post theirs,
  then a 1 KiB send to the next rank); the extra time per round less one fitted latency
  is `p2p_overhead_us`, the receiver's wait to be scheduled.
* DTensor dispatch (CPU, several ranks): a colwise + rowwise Linear pair tensor-parallel
  over pairs of ranks (DTensor, `parallelize_module`) against the same local Linears with
  the same two all-reduces issued by hand, every rank busy; half the difference per step is
  `device.tp_dispatch_overhead_us`, the host time DTensor adds per tensor-parallel site.
  Then an AdamW step over 32 parameters sharded as DTensors against one over plain tensors
  of their local size: the difference per tensor is `device.dtensor_param_step_us`.

The links measured are the ones between the `nproc` ranks of this machine: `intra_node`.
For the `local` preset (one machine) `inter_node` gets the same figures; for a multi-node
preset `inter_node` keeps its datasheet value.

Local (CPU) plans assume one thread per rank: every rank here runs with
`OMP_NUM_THREADS=1` and `torch.set_num_threads(1)`, as `autoplan run` does.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from autoplan.schema.cluster import ClusterSpec

MATMUL_SIZES: dict[str, tuple[int, ...]] = {"cpu": (128, 256, 512, 1024), "cuda": (1024, 2048, 4096, 8192)}
"""Square matmul sizes tried per dtype (a dtype stops growing once one matmul takes MAX_SINGLE_OP_S);
a GPU needs n in the thousands to approach its peak."""
MESSAGE_BYTES: dict[str, tuple[int, ...]] = {"cpu": tuple(4**k * 1024 for k in range(8)),
                                             "cuda": tuple(4**k * 1024 for k in range(10))}
"""Collective message sizes: 1 KiB .. 16 MiB on CPU (a layer's gradients; gloo's rate drops
beyond the caches), .. 256 MiB on GPUs (NVLink needs large messages)."""
ELEMENTWISE_NUMEL: dict[str, int] = {"cpu": 4 * 1024 * 1024, "cuda": 64 * 1024 * 1024}
"""Elements per float32 operand of the elementwise timing: 16 MiB on CPU; 256 MiB on a GPU,
well beyond its L2 cache."""
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
MIN_TIME_S = 0.05
"""Time each matmul / elementwise measurement runs for (repeating the op)."""
MAX_SINGLE_OP_S = 0.1
"""A dtype's size ladder stops after a single matmul takes this long (slow CPU bf16)."""
COLLECTIVE_REPEATS = 5
"""Timed repetitions per collective and size (after one warm-up); the median is kept."""
SHARING_MLP = (256, 512, 2)
"""The shared-core probe: tokens, width, blocks of (Linear(w, 4w), GELU, Linear(4w, w)), forward +
backward: 4 M parameters, ~0.1 s per step alone, so the cores' caches are shared as a model's are."""
SHARING_REPEATS = 3
"""Alone / all-busy alternations of the shared-core probe (the median ratio is kept: a shared
machine's scheduler makes single timings scatter by +-30%)."""
LOADED_MLP = (256, 256, 1)
"""The collective-overhead probe's compute between two all-reduces (~10 ms alone)."""
LOADED_ROUNDS = 20
"""MLP step + small all-reduce (or ring exchange) rounds of the loaded-overhead probes (CPU)."""
LOADED_REPEATS = 7
"""With / without alternations of the loaded-overhead probes (the median difference is kept:
single differences scatter by a factor of two on a shared 2-core VM)."""
DISPATCH_MLP = (16, 64)
"""The DTensor-dispatch probe: tokens, width of a colwise Linear(w, 4w) + rowwise Linear(4w, w)
pair, small enough that its matmuls take microseconds and the host work is what is timed."""
DISPATCH_PARAMS = (32, 4096)
"""The DTensor optimizer probe: parameter tensors x elements, sharded over the probe's pairs."""
DISPATCH_ROUNDS = 20
"""Forward + backward steps per timing of the DTensor-dispatch probe."""
DISPATCH_REPEATS = 5
"""DTensor / by-hand alternations of the dispatch probe (the median difference is kept)."""
ADAM_PARAMS = (32, 1 << 18)
"""The Adam probe's parameters, tensors x elements: 8 M, so its states (4 x 32 MiB) overflow the
caches as a model's do."""


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
        """A copy of `cluster` carrying these measurements, `calibrated=True` (see the module docstring)."""
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
        device["peak_flops"] = {**device["peak_flops"],
                                **{dtype: rate / efficiency for dtype, rate in saturated.items()}}
        memory_efficiency = min(1.0, elementwise_gbps / device["memory_bandwidth_gbps"])
        device["memory_efficiency"] = memory_efficiency
        device["memory_bandwidth_gbps"] = elementwise_gbps / memory_efficiency
        if self.adam_seconds_per_param:  # timed on every rank at once: the all-busy bandwidth prices it
            device["adam_bytes_per_param"] = self.adam_seconds_per_param * elementwise_gbps * 1e9
        if self.link is not None:
            # the communication model uses bandwidth_gbps * LINK_EFFICIENCY as the achieved rate
            link = {"bandwidth_gbps": self.link.bandwidth_gbps / LINK_EFFICIENCY, "latency_us": self.link.latency_us,
                    "collective_overhead_us": self.collective_overhead_us(), "p2p_overhead_us": self.p2p_overhead_us()}
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
            table.add_row("AdamW ns per parameter (bytes moved per parameter)",
                          f"{self.adam_seconds_per_param * 1e9:.3g} "
                          f"({self.adam_seconds_per_param * self.elementwise_gbps * 1e9 / share:.3g})")
        if self.nproc > 1 and self.device == "cpu":
            table.add_row("shared-core slowdown (all ranks busy / one alone)", f"{self.shared_core_slowdown:.3g}")
            table.add_row("collective overhead under load, us", f"{self.collective_overhead_us():.3g}")
            table.add_row("pipeline send overhead under load, us", f"{self.p2p_overhead_us():.3g}")
            if self.tp_dispatch_s is not None:
                table.add_row("DTensor host time per tensor-parallel site, us", f"{self.tp_dispatch_s * 1e6:.3g}")
            if self.dtensor_param_step_s is not None:
                table.add_row("AdamW host time per DTensor parameter, us", f"{self.dtensor_param_step_s * 1e6:.3g}")
        for fit in [*self.collectives.values(), *([self.link] if self.link else [])]:
            table.add_row(f"{fit.name}: latency us / bandwidth GB/s",
                          f"{fit.latency_us:.3g} / {fit.bandwidth_gbps:.3g}")
        return table


def calibrate(cluster: ClusterSpec, device: str = "cpu", nproc: int | None = None, progress: bool = True, *,
              matmul_sizes: tuple[int, ...] | None = None,
              message_bytes: tuple[int, ...] | None = None) -> ClusterSpec:
    """Measure this machine on `nproc` ranks and return `cluster` with the measured figures.

    `nproc` defaults to the cluster's devices per node (CPU) or the visible GPUs (CUDA).
    Takes ~30-60 s with the default sizes on a 2-core machine.

    >>> local = calibrate(ClusterSpec.local(world_size=2), nproc=2)   # doctest: +SKIP
    >>> local.to_file("local.toml")                                  # doctest: +SKIP
    """
    return measure(cluster, device, nproc, progress, matmul_sizes=matmul_sizes,
                   message_bytes=message_bytes).apply(cluster)


def measure(cluster: ClusterSpec, device: str = "cpu", nproc: int | None = None, progress: bool = True, *,
            matmul_sizes: tuple[int, ...] | None = None,
            message_bytes: tuple[int, ...] | None = None) -> Calibration:
    """Run the measurements on `nproc` spawned ranks; `calibrate` is `measure(...).apply(cluster)`."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False on this machine")
    if nproc is None:
        nproc = torch.cuda.device_count() if device == "cuda" else cluster.devices_per_node
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} > {torch.cuda.device_count()} visible GPUs")
    matmul_sizes = MATMUL_SIZES[device] if matmul_sizes is None else matmul_sizes
    message_bytes = MESSAGE_BYTES[device] if message_bytes is None else message_bytes
    if not matmul_sizes or not message_bytes:
        raise ValueError("matmul_sizes and message_bytes must not be empty")
    dtypes = ["float32", *sorted(set(cluster.device.peak_flops) - {"float32"})]
    started = time.perf_counter()
    per_rank = _run_on_ranks(nproc, device, dtypes, tuple(matmul_sizes), tuple(message_bytes), progress)
    alone = device == "cpu" and nproc > 1
    result = Calibration(device=device, nproc=nproc, matmul_flops={}, elementwise_gbps=0.0, rates_alone=alone)
    timed = per_rank[:1] if alone else per_rank
    for dtype in dtypes:
        sizes = min(len(rank["matmul"][dtype]) for rank in timed)
        result.matmul_flops[dtype] = [
            (timed[0]["matmul"][dtype][i][0], statistics.median(rank["matmul"][dtype][i][1] for rank in timed))
            for i in range(sizes)]
    result.elementwise_gbps = statistics.median(rank["elementwise_gbps"] for rank in timed)
    result.adam_seconds_per_param = statistics.median(rank["adam_s_per_param"] for rank in per_rank)
    if per_rank[0].get("sharing") is not None:
        alone_s, busy_s, extra_s = per_rank[0]["sharing"]
        result.shared_core_slowdown = busy_s / alone_s
        result.loaded_extra_us = extra_s * 1e6
        result.tp_dispatch_s, result.dtensor_param_step_s = per_rank[0]["dtensor_s"]
        result.loaded_p2p_extra_us = per_rank[0]["p2p_extra_s"] * 1e6
    if nproc > 1:
        timings = per_rank[0]["collectives"]  # already the max over ranks
        result.collectives = {name: fit_collectives({name: points}, nproc, name) for name, points in timings.items()}
        result.link = fit_collectives(timings, nproc, "link (all collectives)")
    result.wall_s = time.perf_counter() - started
    return result


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
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(values, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    latency_s = max(solution[0].item(), 0.0)
    moved, spent = 0.0, 0.0
    for name, measured in timings.items():
        steps, factor = ring_terms(name, nproc)
        size, seconds = max(measured)
        moved += factor * size
        spent += max(seconds - steps * latency_s, seconds / 2)
    return CollectiveFit(name=label, latency_us=latency_s * 1e6, bandwidth_gbps=moved / spent / 1e9,
                         points=sorted(points))


# ------------------------------------------------------------------ the spawned ranks
def _run_on_ranks(nproc: int, device: str, dtypes: list[str], matmul_sizes: tuple[int, ...],
                  message_bytes: tuple[int, ...], progress: bool) -> list[dict]:
    """Spawn `nproc` ranks running `_rank_main`, show rank 0's progress, return each rank's dict."""
    import queue as queue_module

    import torch.multiprocessing as mp
    from rich.progress import Progress

    from autoplan.runtime.launch import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    total = len(dtypes) + 2 + (len(COLLECTIVES) * len(message_bytes) + 2 if nproc > 1 else 0)
    processes = [context.Process(target=_rank_main, daemon=True,
                                 args=(rank, nproc, port, device, dtypes, matmul_sizes, message_bytes, queue))
                 for rank in range(nproc)]
    for process in processes:
        process.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + 120 + 30 * nproc
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"calibrating {nproc} {device} rank(s)", total=total)
            while len(results) < nproc:
                try:
                    rank, kind, value = queue.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [rank for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"calibration rank(s) {dead} died with exit code "
                                           f"{processes[dead[0]].exitcode} before reporting") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"calibration timed out; {nproc - len(results)} rank(s) "
                                           "never finished") from None
                    continue
                if kind == "progress":
                    bar.update(task, advance=1, description=value)
                elif kind == "error":
                    raise RuntimeError(f"calibration failed on rank {rank}: {value}")
                else:
                    results[rank] = value
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return [results[rank] for rank in range(nproc)]


def _rank_main(rank: int, nproc: int, port: int, device: str, dtypes: list[str], matmul_sizes: tuple[int, ...],
               message_bytes: tuple[int, ...], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=120))
        timer = _Timer(device)

        def report(label: str) -> None:
            if rank == 0:
                queue.put((rank, "progress", label))

        result = {"matmul": {}, "collectives": {}}
        active = device == "cuda" or nproc == 1 or rank == 0  # CPU rates are timed alone (module docstring)
        dist.barrier()
        for dtype in dtypes:
            result["matmul"][dtype] = _time_matmuls(timer, getattr(torch, dtype), matmul_sizes, active)
            report(f"matmul {dtype}")
        dist.barrier()
        result["elementwise_gbps"] = _time_elementwise(timer) if active else 0.0
        report("elementwise bandwidth")
        dist.barrier()
        result["adam_s_per_param"] = _time_adam(timer)
        report("AdamW step")
        if nproc > 1:
            result["sharing"] = _time_sharing(timer, rank) if device == "cpu" else None
            result["p2p_extra_s"] = _time_loaded_p2p(rank, nproc) if device == "cpu" else None
            report("shared cores")
            result["dtensor_s"] = _time_tp_dispatch(nproc, rank) if device == "cpu" else None
            report("DTensor dispatch")
            for name in COLLECTIVES:
                result["collectives"][name] = []
                for size in message_bytes:
                    result["collectives"][name].append(_time_collective(timer, name, size, nproc, rank))
                    report(f"{name} {size} B")
        queue.put((rank, "ok", result))
    except BaseException as error:  # reported to the parent as one line
        queue.put((rank, "error", f"{type(error).__name__}: {error}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Timer:
    """Seconds of one call of `fn`: perf_counter on CPU, CUDA events on a GPU."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def once(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    def repeated(self, fn) -> float:
        """Median seconds per call, repeating `fn` for about MIN_TIME_S after one warm-up call."""
        first = self.once(fn)
        times = [first] if first >= MIN_TIME_S else []
        while sum(times) < MIN_TIME_S or len(times) < 3 and sum(times) < 10 * MIN_TIME_S:
            times.append(self.once(fn))
        return statistics.median(times)


def _time_matmuls(timer: _Timer, dtype: torch.dtype, sizes: tuple[int, ...], active: bool = True
                  ) -> list[tuple[int, float]]:
    """(n, FLOP/s) per size; the active ranks time the same size at once, all stop growing together
    (an inactive rank waits in the barriers and reports 0)."""
    import torch.distributed as dist

    points = []
    for n in sizes:
        a = torch.randn(n, n, device=timer.device).to(dtype)
        b = torch.randn(n, n, device=timer.device).to(dtype)
        dist.barrier()
        seconds = timer.repeated(lambda: torch.mm(a, b)) if active else 0.0
        points.append((n, 2 * n**3 / seconds if active else 0.0))
        slowest = torch.tensor([seconds], device=timer.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if slowest.item() > MAX_SINGLE_OP_S:
            break
    return points


def _time_elementwise(timer: _Timer) -> float:
    a, b, c = (torch.randn(ELEMENTWISE_NUMEL[timer.device.type], device=timer.device) for _ in range(3))
    seconds = timer.repeated(lambda: torch.add(a, b, out=c))
    return 3 * a.numel() * a.element_size() / seconds / 1e9


def _time_adam(timer: _Timer) -> float:
    """Seconds per parameter of one AdamW step (after a warm-up step that creates the states)."""
    count, numel = ADAM_PARAMS
    params = [torch.nn.Parameter(torch.randn(numel, device=timer.device)) for _ in range(count)]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return timer.repeated(optimizer.step) / (count * numel)


def _probe_mlp(tokens: int, width: int, blocks: int):
    """A forward + backward step of `blocks` x (Linear(w, 4w), GELU, Linear(4w, w)) on `tokens` rows."""
    layers = [m for _ in range(blocks) for m in (torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                                   torch.nn.Linear(4 * width, width))]
    mlp, x = torch.nn.Sequential(*layers), torch.randn(tokens, width)

    def step() -> None:
        mlp(x).sum().backward()

    step()
    return step


def _slowest(seconds: float) -> float:
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def _time_sharing(timer: _Timer, rank: int) -> tuple[float, float, float]:
    """(seconds of one probe-MLP step on rank 0 alone, on every rank at once (the slowest, at the
    median ratio), extra seconds per round of a 1 KiB all-reduce issued between smaller steps)."""
    import torch.distributed as dist

    step = _probe_mlp(*SHARING_MLP)
    pairs = []
    for _ in range(SHARING_REPEATS):
        dist.barrier()
        alone = timer.repeated(step) if rank == 0 else 0.0  # the others wait in the barrier
        dist.barrier()
        pairs.append((_slowest(alone), _slowest(timer.repeated(step))))
    alone, busy = sorted(pairs, key=lambda pair: pair[1] / pair[0])[len(pairs) // 2]

    small_step, small = _probe_mlp(*LOADED_MLP), torch.zeros(256)

    def synced() -> None:
        small_step()
        dist.all_reduce(small)

    extra = _median_extra_s(synced, small_step, LOADED_ROUNDS, LOADED_REPEATS)
    return alone, busy, extra


def _time_loaded_p2p(rank: int, nproc: int) -> float:
    """Extra seconds per round of a ring exchange (receive posted ahead, as a pipeline
    schedule does; a 1 KiB activation to the next rank) between probe-MLP steps, every rank
    busy: a pipeline send's wait for its peer to be scheduled."""
    import torch.distributed as dist

    step, buffer, inbox = _probe_mlp(*LOADED_MLP), torch.zeros(256), torch.zeros(256)

    def exchanged() -> None:
        pending = dist.batch_isend_irecv([dist.P2POp(dist.irecv, inbox, (rank - 1) % nproc)])
        step()
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, buffer, (rank + 1) % nproc)]) + pending:
            work.wait()

    return _median_extra_s(exchanged, step, LOADED_ROUNDS, LOADED_REPEATS)


def _per_round_s(fn, rounds: int) -> float:
    """Seconds per call of `fn`, `rounds` calls on every rank at once, the slowest rank's."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return _slowest(time.perf_counter() - start) / rounds


def _median_extra_s(with_fn, without_fn, rounds: int, repeats: int) -> float:
    """How much longer a round of `with_fn` takes than one of `without_fn`, >= 0: the median
    over `repeats` alternations (after one warm-up of each), every rank running them at once."""
    _per_round_s(with_fn, rounds), _per_round_s(without_fn, rounds)
    extra = statistics.median(_per_round_s(with_fn, rounds) - _per_round_s(without_fn, rounds)
                              for _ in range(repeats))
    return max(extra, 0.0)


def _time_tp_dispatch(nproc: int, rank: int) -> tuple[float, float]:
    """Host seconds DTensor adds per tensor-parallel site and step, and per parameter tensor of
    an AdamW step (module docstring), each >= 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tokens, width = DISPATCH_MLP
    tp = 2 if nproc % 2 == 0 else nproc
    mesh = init_device_mesh("cpu", (nproc // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    split = torch.nn.ModuleDict({"fc": torch.nn.Linear(width, 4 * width), "proj": torch.nn.Linear(4 * width, width)})
    parallelize_module(split, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
    fc, proj = torch.nn.Linear(width, 4 * width // tp), torch.nn.Linear(4 * width // tp, width)
    group = mesh.get_group()
    x = torch.randn(tokens, width, requires_grad=True)

    def tensor_parallel() -> None:  # all-reduces: proj's output forward, x's gradient backward
        split["proj"](torch.nn.functional.gelu(split["fc"](x))).sum().backward()

    def by_hand() -> None:
        y = proj(torch.nn.functional.gelu(fc(x)))
        dist.all_reduce(y.detach(), group=group)
        y.sum().backward()
        dist.all_reduce(x.grad, group=group)

    extra = _median_extra_s(tensor_parallel, by_hand, DISPATCH_ROUNDS, DISPATCH_REPEATS)

    count, numel = DISPATCH_PARAMS
    plain = [torch.nn.Parameter(torch.randn(numel // tp)) for _ in range(count)]
    sharded = [torch.nn.Parameter(distribute_tensor(torch.randn(numel), mesh, [Shard(0)])) for _ in range(count)]
    for param in plain + sharded:
        param.grad = torch.randn_like(param)
    step_extra = _median_extra_s(torch.optim.AdamW(sharded, lr=1e-4).step, torch.optim.AdamW(plain, lr=1e-4).step,
                                 DISPATCH_ROUNDS, DISPATCH_REPEATS)  # the warm-up creates the states
    return extra / 2, step_extra / count


def _time_collective(timer: _Timer, name: str, size: int, nproc: int, rank: int) -> tuple[int, float]:
    """(bytes S moved, median over COLLECTIVE_REPEATS of the slowest rank's seconds) for about `size` bytes."""
    import torch.distributed as dist

    numel = max(size // 4 // nproc, 1) * nproc  # float32, divisible by nproc
    full = torch.ones(numel, device=timer.device)
    part = torch.ones(numel // nproc, device=timer.device)
    # torch >= 2.10 names these *_single and deprecates the *_tensor spellings.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    peer = rank ^ 1  # pairs (0,1), (2,3)...; an odd world leaves the last rank out

    def send_recv() -> None:
        if peer >= nproc:
            return
        if rank % 2 == 0:
            dist.send(full, peer)
        else:
            dist.recv(full, peer)

    run = {"all_reduce": lambda: dist.all_reduce(full),
           "all_gather": lambda: all_gather(full, part),
           "reduce_scatter": lambda: reduce_scatter(part, full),
           "send_recv": send_recv}[name]
    times = []
    for repeat in range(COLLECTIVE_REPEATS + 1):
        dist.barrier()
        seconds = timer.once(run)
        if repeat:  # the first call warms up the connection
            times.append(seconds)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return full.numel() * full.element_size(), statistics.median(slowest.tolist())
