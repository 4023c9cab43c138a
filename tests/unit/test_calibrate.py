import math
import statistics
import time

import pytest
import torch

from autoplan import ClusterSpec
from autoplan.costmodels.communication import estimate_collective_s, estimate_p2p_s, group_levels
from autoplan.costmodels.compute import matmul_efficiency
from autoplan.measure.calibrate import calibrate
from autoplan.measure.calibration import Calibration, fit_collectives, ring_terms

MATMUL_N = 256


def _direct_matmul_s(n: int) -> float:
    """A fresh single-thread timing of one n x n float32 matmul, median of repeats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.distributed  # calibrate spawns 2 gloo ranks
def test_two_rank_calibration_is_positive_and_reproduces_a_direct_matmul_timing():
    preset = ClusterSpec.local(world_size=2)
    cluster = calibrate(
        preset, nproc=2, progress=False, matmul_sizes=(64, 128, MATMUL_N), message_bytes=(4096, 65536, 1 << 20)
    )
    assert cluster.calibrated and not preset.calibrated
    device = cluster.device
    numbers = [
        *device.peak_flops.values(),
        device.matmul_efficiency,
        device.memory_bandwidth_gbps,
        device.memory_efficiency,
        cluster.intra_node.bandwidth_gbps,
        cluster.intra_node.latency_us,
    ]
    assert all(math.isfinite(x) and x > 0 for x in numbers), numbers
    assert cluster.intra_node != preset.intra_node and cluster.inter_node == cluster.intra_node
    # DTensor's wrapping and sharding propagation cost host time beyond the same collectives by hand
    assert device.tp_dispatch_overhead_us > 0
    assert device.tp_dispatch_overhead_us != preset.device.tp_dispatch_overhead_us
    assert device.dtensor_param_step_us > 0 and device.dtensor_param_step_us != preset.device.dtensor_param_step_us
    flops = 2 * MATMUL_N**3
    implied_s = flops / (device.peak_flops["float32"] * matmul_efficiency(flops, device))
    direct_s = _direct_matmul_s(MATMUL_N)
    # The calibrated rate must describe this machine's matmuls, not a datasheet's: the same
    # order of magnitude as a direct timing. Only that: the calibration ran on 2 ranks sharing
    # cores, the direct timing on one, and another job may load the machine meanwhile.
    assert direct_s / 10 < implied_s < direct_s * 10, (implied_s, direct_s)


def _synthetic_calibration(nproc: int, latency_s: float, bandwidth_bps: float) -> Calibration:
    """Timings that follow the ring model exactly for a known link."""
    timings = {}
    for name in ("all_reduce", "all_gather", "reduce_scatter", "send_recv"):
        steps, factor = ring_terms(name, nproc)
        timings[name] = [(size, steps * latency_s + factor * size / bandwidth_bps) for size in (1e3, 1e5, 1e7)]
    return Calibration(
        device="cpu",
        nproc=nproc,
        matmul_flops={"float32": [(512, 50e9), (1024, 60e9)]},
        elementwise_gbps=5.0,
        collectives={},
        link=fit_collectives(timings, nproc, "link"),
    )


def test_fit_recovers_a_known_link_and_the_cost_model_reproduces_the_timings():
    nproc, latency_s, bandwidth_bps = 4, 200e-6, 0.8e9
    calibration = _synthetic_calibration(nproc, latency_s, bandwidth_bps)
    assert calibration.link.latency_us == pytest.approx(200.0, rel=1e-6)
    assert calibration.link.bandwidth_gbps == pytest.approx(0.8, rel=1e-6)
    cluster = calibration.apply(ClusterSpec.local(world_size=nproc))
    levels = group_levels(cluster, size=nproc, stride=1)
    size = 4e6
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        steps, factor = ring_terms(kind, nproc)
        expected = steps * latency_s + factor * size / bandwidth_bps
        assert estimate_collective_s(kind, size, levels) == pytest.approx(expected, rel=1e-6), kind
    assert estimate_p2p_s(size, cluster.intra_node) == pytest.approx(latency_s + size / bandwidth_bps, rel=1e-6)


def test_apply_makes_the_cost_model_reproduce_the_large_matmul_rate():
    calibration = _synthetic_calibration(2, 100e-6, 1e9)
    calibration.matmul_flops = {"float32": [(1024, 60e9)]}
    cluster = calibration.apply(ClusterSpec.local(world_size=2))
    flops = 2 * 1024**3
    rate = cluster.device.peak_flops["float32"] * matmul_efficiency(flops, cluster.device)
    assert rate == pytest.approx(60e9, rel=1e-6)
    assert cluster.device.memory_bandwidth_gbps * cluster.device.memory_efficiency == pytest.approx(5.0)
    assert cluster.device.matmul_efficiency <= 1.0


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="device"):
        calibrate(ClusterSpec.local(world_size=2), device="tpu", progress=False)
    with pytest.raises(ValueError, match="nproc"):
        calibrate(ClusterSpec.local(world_size=2), nproc=0, progress=False)


def ring_timings(latency_s: float, nproc: int = 4) -> dict[str, list[tuple[float, float]]]:
    """Synthetic all-reduce and send/recv timings of a ring with `latency_s` per step and 1 GB/s."""
    return {
        name: [
            (size, ring_terms(name, nproc)[0] * latency_s + ring_terms(name, nproc)[1] * size / 1e9)
            for size in (1e3, 1e6)
        ]
        for name in ("all_reduce", "send_recv")
    }


def synthetic_calibration(**changes) -> Calibration:
    """A local:4 measurement of a plausible 2-core machine (every field near the preset's)."""
    fields = dict(
        device="cpu",
        nproc=4,
        matmul_flops={"float32": [(256, 90e9), (512, 92e9), (1024, 60e9)]},
        elementwise_gbps=25.0,
        link=fit_collectives(ring_timings(5e-4), 4, "link"),
        shared_core_slowdown=2.2,
        rates_alone=True,
        adam_seconds_per_param=5e-9,
        loaded_extra_us=6000.0,
        loaded_p2p_extra_us=1500.0,
        loaded_round_us=20000.0,
        tp_dispatch_s=2e-3,
        dtensor_param_step_s=6e-4,
    )
    fields.update(changes)
    return Calibration(**fields)


def test_rates_timed_alone_are_divided_by_the_shared_core_slowdown():
    measured = synthetic_calibration(
        matmul_flops={"float32": [(1024, 80e9)]},
        elementwise_gbps=20.0,
        link=fit_collectives(ring_timings(1e-3), 4, "link"),
        shared_core_slowdown=2.0,
        loaded_extra_us=9000.0,
        loaded_p2p_extra_us=3000.0,
        loaded_round_us=None,
    )
    preset = ClusterSpec.local(world_size=4)  # as on 2 cores, whatever this machine has (the sanity bounds)
    preset = preset.model_copy(update={"device": preset.device.model_copy(update={"shared_core_slowdown": 2.0})})
    cluster = measured.apply(preset)
    device = cluster.device
    assert device.shared_core_slowdown == 2.0
    assert device.memory_bandwidth_gbps * device.memory_efficiency == pytest.approx(10.0)
    # AdamW is timed alone as the elementwise bandwidth is: the bytes it moves whatever the sharing
    assert device.adam_bytes_per_param == pytest.approx(5e-9 * 20e9)
    # the extra time of a loaded all-reduce beyond its 6 fitted latencies of 1 ms
    assert cluster.intra_node.collective_overhead_us == pytest.approx(9000.0 - 6 * 1000.0, rel=1e-3)
    # a ring exchange sends one message: one fitted latency
    assert cluster.intra_node.p2p_overhead_us == pytest.approx(3000.0 - 1000.0, rel=1e-3)
    assert cluster.inter_node == cluster.intra_node
    assert device.tp_dispatch_overhead_us == pytest.approx(2000.0)
    assert device.dtensor_param_step_us == pytest.approx(600.0)
