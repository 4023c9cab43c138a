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
  F / (F + device.matmul_half_efficiency_flops)` (costmodels/compute.py). Calibration solves
  each measured point (n, achieved) for the saturated rate
  `R[dtype] = achieved / (F / (F + device.matmul_half_efficiency_flops))` through that same
  function and keeps the median over the sizes on CPU ranks (one size slowed by another
  process or past the caches moves it by nothing), the largest size's on a GPU; then
  `matmul_efficiency = min(1, R[float32] / preset peak_flops[float32])` and
  `peak_flops[dtype] = R[dtype] / matmul_efficiency` for every measured dtype. The float32
  peak keeps its datasheet value unless the machine beats it, so MFU stays relative to
  the datasheet. The fitted half-rate FLOPs of this device is reported beside it.
* The rate a layer's matmuls reach (CPU ranks): a bare square matmul is the best case; a
  training layer's matmuls run inside autograd (transposed operands in backward) beside
  attention's small per-head products, and measured here a transformer block of
  gpt-small-demo's width ran ~1.3x slower than its roofline at the bare-matmul rate. So a
  GPT transformer block (probes.BLOCK_PROBE: widths 256 and 512, 2 x 128 tokens) is timed
  forward + backward on rank 0 alone, and the matmul rate written is the one with which the
  cost model's own roofline (`estimate_layer_time`, at the measured elementwise bandwidth and
  host cost) reproduces those times (the median over the widths; `Calibration.layer_fit`).
  The other dtypes keep their measured ratio to float32. The bare-matmul rates are still
  printed.
* Host work per op (CPU ranks, `device.op_overhead_us`): eager PyTorch dispatches every op
  through the dispatcher and autograd, a fixed cost whatever the tensors' size, which
  dominates small layers. The same GPT block at width 32 with 8 tokens (probes.HOST_PROBE: its
  arithmetic ~3% of its time) is run from cold caches, as a profile times layers, on rank 0
  alone, the least of HOST_REPEATS runs; its time less that arithmetic over its ops (counted by
  the profile) is the cost per op alone, multiplied by the shared-core slowdown (the rates are
  divided by it).
  Fitting it beside the rate from the two widths' difference instead moved it several-fold
  between calibrations: it is a few percent of the width-256 block.
* Elementwise bandwidth: `c = a + b` over large float32 tensors moves 3 x 4 bytes per
  element. The same rule: `memory_efficiency = min(1, measured / preset bandwidth)`,
  `memory_bandwidth_gbps = measured / memory_efficiency`.
* Adam: one `torch.optim.AdamW` step over ADAM_PARAMS float32 parameters, timed as the
  elementwise bandwidth is (rank 0 alone on CPU ranks, the least of three timings);
  `adam_bytes_per_param = seconds per parameter * that elementwise bandwidth`, the traffic the
  cost model then charges per parameter (28 for a fused GPU kernel). The bytes a step moves
  do not depend on how many ranks share the cores, and timed alone they are steady: timed on
  every rank at once, two calibrations a minute apart gave 65 and 48.
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

Sanity bounds (`autoplan.measure.calibration.RELATIVE_BOUNDS`): a measured quantity far
outside what its preset could plausibly be off by (4x for a rate, a slowdown below N / C or
above 1.5 N / C for N ranks on C cores, a per-call overhead longer than the probe's compute
between two calls) says more about whatever else ran than about the machine: `apply` keeps
the preset's value for it and `Calibration.kept_preset` (the table, `autoplan calibrate`'s
warnings) says which and why. The CPU time other processes used meanwhile is measured from
/proc/stat (`Calibration.background_cores`); more than BUSY_MACHINE_CORES warns that the
result describes a loaded machine.

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
import warnings
from datetime import timedelta
from typing import Any

import torch

from autoplan.measure.calibration import COLLECTIVES, Calibration, fit_collectives
from autoplan.measure.probes import (
    _time_adam,
    _time_blocks,
    _time_collective,
    _time_elementwise,
    _time_host_block,
    _time_loaded_p2p,
    _time_matmuls,
    _time_sharing,
    _time_tp_dispatch,
    _Timer,
)
from autoplan.schema.cluster import ClusterSpec

MATMUL_SIZES: dict[str, tuple[int, ...]] = {"cpu": (128, 256, 512, 1024), "cuda": (1024, 2048, 4096, 8192)}
"""Square matmul sizes tried per dtype (a dtype stops growing once one matmul takes probes.MAX_SINGLE_OP_S);
a GPU needs n in the thousands to approach its peak."""
MESSAGE_BYTES: dict[str, tuple[int, ...]] = {
    "cpu": tuple(4**k * 1024 for k in range(8)),
    "cuda": tuple(4**k * 1024 for k in range(10)),
}
"""Collective message sizes: 1 KiB .. 16 MiB on CPU (a layer's gradients; gloo's rate drops
beyond the caches), .. 256 MiB on GPUs (NVLink needs large messages)."""


def calibrate(
    cluster: ClusterSpec,
    device: str = "cpu",
    nproc: int | None = None,
    progress: bool = True,
    *,
    matmul_sizes: tuple[int, ...] | None = None,
    message_bytes: tuple[int, ...] | None = None,
) -> ClusterSpec:
    """Measure this machine on `nproc` ranks and return `cluster` with the measured figures.

    `nproc` defaults to the cluster's devices per node (CPU) or the visible GPUs (CUDA).
    Takes ~30-60 s with the default sizes on a 2-core machine.

    >>> local = calibrate(ClusterSpec.local(world_size=2), nproc=2)   # doctest: +SKIP
    >>> local.to_file("local.toml")                                  # doctest: +SKIP
    """
    return measure(cluster, device, nproc, progress, matmul_sizes=matmul_sizes, message_bytes=message_bytes).apply(
        cluster
    )


def measure(
    cluster: ClusterSpec,
    device: str = "cpu",
    nproc: int | None = None,
    progress: bool = True,
    *,
    matmul_sizes: tuple[int, ...] | None = None,
    message_bytes: tuple[int, ...] | None = None,
) -> Calibration:
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
    started, busy_before, parent_before = time.perf_counter(), _busy_cpu_s(), time.process_time()
    per_rank = _run_on_ranks(nproc, device, dtypes, tuple(matmul_sizes), tuple(message_bytes), progress)
    busy_after, wall_s = _busy_cpu_s(), time.perf_counter() - started
    alone = device == "cpu" and nproc > 1
    result = Calibration(device=device, nproc=nproc, matmul_flops={}, elementwise_gbps=0.0, rates_alone=alone)
    timed = per_rank[:1] if alone else per_rank
    for dtype in dtypes:
        sizes = min(len(rank["matmul"][dtype]) for rank in timed)
        result.matmul_flops[dtype] = [
            (timed[0]["matmul"][dtype][i][0], statistics.median(rank["matmul"][dtype][i][1] for rank in timed))
            for i in range(sizes)
        ]
    result.elementwise_gbps = statistics.median(rank["elementwise_gbps"] for rank in timed)
    result.block_s = [
        (timed[0]["blocks"][i][0], statistics.median(rank["blocks"][i][1] for rank in timed))
        for i in range(len(timed[0]["blocks"]))
    ]
    if timed[0]["host_block_s"] is not None:
        result.host_block_s = statistics.median(rank["host_block_s"] for rank in timed)
    result.adam_seconds_per_param = statistics.median(rank["adam_s_per_param"] for rank in timed)
    if per_rank[0].get("sharing") is not None:
        alone_s, busy_s, extra_s, round_s = per_rank[0]["sharing"]
        result.shared_core_slowdown = busy_s / alone_s
        result.loaded_extra_us = extra_s * 1e6
        result.loaded_round_us = round_s * 1e6
        result.tp_dispatch_s, result.dtensor_param_step_s = per_rank[0]["dtensor_s"]
        result.loaded_p2p_extra_us = per_rank[0]["p2p_extra_s"] * 1e6
    if nproc > 1:
        timings = per_rank[0]["collectives"]  # already the max over ranks
        result.collectives = {name: fit_collectives({name: points}, nproc, name) for name, points in timings.items()}
        result.link = fit_collectives(timings, nproc, "link (all collectives)")
    result.wall_s = wall_s
    if busy_before is not None and busy_after is not None:
        ours = sum(rank["cpu_s"] for rank in per_rank) + time.process_time() - parent_before
        result.background_cores = max(0.0, (busy_after - busy_before - ours) / wall_s)
    return result


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time this machine's cores have spent busy since boot (/proc/stat), None
    where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(fields[:8]) - idle) / ticks


# ------------------------------------------------------------------ the spawned ranks
def _run_on_ranks(
    nproc: int,
    device: str,
    dtypes: list[str],
    matmul_sizes: tuple[int, ...],
    message_bytes: tuple[int, ...],
    progress: bool,
) -> list[dict]:
    """Spawn `nproc` ranks running `_rank_main`, show rank 0's progress, return each rank's dict."""
    import queue as queue_module

    import torch.multiprocessing as mp
    from rich.progress import Progress

    from autoplan.runtime.launch import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    total = len(dtypes) + 3 + (len(COLLECTIVES) * len(message_bytes) + 2 if nproc > 1 else 0)
    processes = [
        context.Process(
            target=_rank_main, daemon=True, args=(rank, nproc, port, device, dtypes, matmul_sizes, message_bytes, queue)
        )
        for rank in range(nproc)
    ]
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
                        raise RuntimeError(
                            f"calibration rank(s) {dead} died with exit code "
                            f"{processes[dead[0]].exitcode} before reporting"
                        ) from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"calibration timed out; {nproc - len(results)} rank(s) never finished"
                        ) from None
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


def _rank_main(
    rank: int,
    nproc: int,
    port: int,
    device: str,
    dtypes: list[str],
    matmul_sizes: tuple[int, ...],
    message_bytes: tuple[int, ...],
    queue,
) -> None:
    from autoplan.runtime.launch import loopback_rank_env

    os.environ.update(loopback_rank_env(rank, nproc, port))
    import torch.distributed as dist

    # The probes build DTensors on a CPU mesh only to time their dispatch; torch's notice that
    # DTensor random ops may be incomplete there is about what the probes never use. This is
    # a spawned probe process: its filters end with it.
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
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

        result: dict[str, Any] = {"matmul": {}, "collectives": {}}
        active = device == "cuda" or nproc == 1 or rank == 0  # CPU rates are timed alone (module docstring)
        dist.barrier()
        for dtype in dtypes:
            result["matmul"][dtype] = _time_matmuls(timer, getattr(torch, dtype), matmul_sizes, active)
            report(f"matmul {dtype}")
        dist.barrier()
        result["elementwise_gbps"] = _time_elementwise(timer) if active else 0.0
        report("elementwise bandwidth")
        result["blocks"] = _time_blocks(timer, active) if device == "cpu" else []
        result["host_block_s"] = _time_host_block(timer, active) if device == "cpu" else None
        report("transformer block")
        dist.barrier()
        result["adam_s_per_param"] = _time_adam(timer) if active else 0.0
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
        result["cpu_s"] = time.process_time()
        queue.put((rank, "ok", result))
    except BaseException as error:  # reported to the parent as one line
        queue.put((rank, "error", f"{type(error).__name__}: {error}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
