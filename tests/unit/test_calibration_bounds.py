"""Calibration's sanity bounds: an implausible measurement keeps the preset's value and says so;
a plausible one is written; the matmul rate is the median over the sizes on CPU ranks."""

import pytest

from autoplan import ClusterSpec
from autoplan.measure.calibration import (
    CONSTANT_GROUPS,
    RELATIVE_BOUNDS,
    quantity_value,
    reset_quantities,
)
from tests.unit.test_calibrate import synthetic_calibration as _calibration


@pytest.fixture
def preset() -> ClusterSpec:
    # 4 ranks on 2 cores whatever this machine has, so the bounds below do not depend on it
    cluster = ClusterSpec.local(world_size=4)
    return cluster.model_copy(update={"device": cluster.device.model_copy(update={"shared_core_slowdown": 2.0})})


def test_a_plausible_measurement_is_written_whole(preset):
    calibration = _calibration()
    cluster = calibration.apply(preset)
    assert calibration.kept_preset == {}
    assert cluster.device.shared_core_slowdown == pytest.approx(2.2)
    assert cluster.intra_node.collective_overhead_us > 0
    assert cluster.device.tp_dispatch_overhead_us == pytest.approx(2000.0)


def test_cpu_matmul_rate_is_the_median_over_sizes_not_the_largest_size(preset):
    cluster = _calibration().apply(preset)
    rate = quantity_value(cluster, "matmul rate")
    # the 1024 point (60 GFLOP/s, past the caches or interrupted) does not set it: ~90 / 2.2
    assert 38e9 < rate < 43e9


def test_a_slowdown_beyond_core_sharing_keeps_the_preset_and_divides_the_rates_by_it(preset):
    calibration = _calibration(shared_core_slowdown=3.6)  # another process held a core
    cluster = calibration.apply(preset)
    assert "shared-core slowdown" in calibration.kept_preset
    assert cluster.device.shared_core_slowdown == 2.0
    assert quantity_value(cluster, "elementwise bandwidth") == pytest.approx(25.0 / 2.0)
    assert calibration.warnings() and "shared-core slowdown" in calibration.warnings()[0]


def test_an_overhead_longer_than_the_compute_between_calls_keeps_the_preset(preset):
    calibration = _calibration(loaded_extra_us=40000.0)
    cluster = calibration.apply(preset)
    assert "collective overhead" in calibration.kept_preset
    assert cluster.intra_node.collective_overhead_us == preset.intra_node.collective_overhead_us
    assert cluster.inter_node.collective_overhead_us == preset.inter_node.collective_overhead_us
    assert cluster.intra_node.p2p_overhead_us > 0  # the other one stands


def test_a_rate_off_by_more_than_the_bounds_keeps_the_preset(preset):
    low, _ = RELATIVE_BOUNDS["matmul rate"]
    tiny = quantity_value(preset, "matmul rate") * low / 10 * 2.2
    calibration = _calibration(matmul_flops={"float32": [(512, tiny)]})
    cluster = calibration.apply(preset)
    assert "matmul rate" in calibration.kept_preset
    assert quantity_value(cluster, "matmul rate") == pytest.approx(quantity_value(preset, "matmul rate"))
    assert cluster.calibrated


def test_a_loaded_machine_warns():
    calibration = _calibration(background_cores=1.1)
    assert any("loaded machine" in line for line in calibration.warnings())
    assert not _calibration(background_cores=0.05).warnings()


def test_reset_quantities_restores_every_field_of_each_quantity(preset):
    calibrated = _calibration().apply(preset)
    for quantity in CONSTANT_GROUPS:
        reset = reset_quantities(calibrated, preset, [quantity])
        assert quantity_value(reset, quantity) == pytest.approx(quantity_value(preset, quantity)), quantity
    everything = reset_quantities(calibrated, preset, CONSTANT_GROUPS)
    assert everything.model_dump(exclude={"calibrated"}) == preset.model_dump(exclude={"calibrated"})


def test_the_layer_probe_sets_the_matmul_rate_and_per_op_host_time_through_the_roofline(preset):
    from autoplan.costmodels.compute import estimate_layer_time
    from autoplan.measure.calibration import _probe_layer
    from autoplan.measure.probes import BLOCK_PROBE, HOST_PROBE

    # times the roofline gives at 60 GFLOP/s and 12 us per op alone, at the measured bandwidth:
    # solved back to both
    device = preset.device.model_copy(
        update={
            "peak_flops": {"float32": 60e9},
            "matmul_efficiency": 1.0,
            "memory_bandwidth_gbps": 25.0,
            "memory_efficiency": 1.0,
            "op_overhead_us": 12.0,
        }
    )

    def seconds(width: int, probe: tuple) -> float:
        options = dict(micro_batch_size=probe[0], tp=1, sequence_parallel=False, recompute="none")
        return estimate_layer_time(_probe_layer(width, probe), device, compute_dtype="float32", **options).total_s

    block_s = [(w, seconds(w, BLOCK_PROBE)) for w in BLOCK_PROBE[3]]
    host_s = seconds(HOST_PROBE[3][0], HOST_PROBE)
    assert _probe_layer(HOST_PROBE[3][0], HOST_PROBE).forward_ops == _probe_layer(256).forward_ops  # the same ops
    calibration = _calibration(block_s=block_s, host_block_s=host_s)
    assert calibration.layer_fit(preset.device) == pytest.approx((60e9, 12e-6), rel=1e-6)
    cluster = calibration.apply(preset)
    # all-busy: alone / slowdown (the host's too); the GEMM probe's 90 GFLOP/s is not what a layer reaches
    assert quantity_value(cluster, "matmul rate") == pytest.approx(60e9 / 2.2, rel=1e-6)
    assert cluster.device.op_overhead_us == pytest.approx(12.0 * 2.2, rel=1e-6)
    assert _calibration(block_s=[(256, 1e-9)]).layer_fit(preset.device) is None  # faster than its memory traffic
    # no host probe (a calibration from before it): no host term, the rate takes it all
    rate, op_s = _calibration(block_s=block_s).layer_fit(preset.device)
    assert op_s == 0.0 and rate < 60e9
