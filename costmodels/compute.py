"""Roofline time of one layer for one micro-batch on one device.

    matmul time      = FLOPs / (peak(dtype) * efficiency(FLOPs))
    efficiency(F)    = device.matmul_efficiency * F / (F + device.matmul_half_efficiency_flops)
    elementwise time = elementwise_bytes / (memory_bandwidth * memory_efficiency)
    host time        = ops dispatched * device.op_overhead_us

Elementwise bytes are the profile's unfused per-op traffic (eager PyTorch runs each op as a
kernel of its own), in a 16-bit dtype at the share the layer's bfloat16 meta run moved
(`LayerProfile.elementwise_bytes_scale`: a norm or loss that upcasts moves float32 bytes).

The efficiency curve saturates at `device.matmul_efficiency` for large layers and
halves at `device.matmul_half_efficiency_flops`: small GEMMs do not fill the device's SMs and pay
kernel-launch latency. Tensor parallelism divides `tp_flops_fraction` of the FLOPs
by t (and the curve sees the smaller per-rank matmuls). Elementwise traffic is split
like the saved activations: the tensor-parallel share of `saved_bytes["none"]` is
divided by t, the rest only with sequence parallelism. Backward elementwise work is
charged twice the forward (it reads the saved input and the incoming gradient and
writes the outgoing gradient).

Recomputation adds forward work in backward: "full" the whole forward, "selective"
the non-matmul part (norms, activations, softmax/attention core), estimated by the
forward elementwise time.

Host time is the per-op work of eager PyTorch (dispatch, autograd, allocation): the same
whatever the micro-batch or tp split, so it dominates small layers on a CPU rank (an
embedding's forward + backward is ~6 ops: ~0.1 ms of host work to microseconds of
arithmetic). 0 on GPUs, where it runs ahead of the kernels.

When the profile carries `measured_fwd_s` / `measured_bwd_s` for this device the
measured seconds replace the roofline (scaled by tp the same way): the time measured at
this micro-batch size, or interpolated from the sizes measured
(`LayerProfile.measured_micro_batch_s`, `autoplan profile`).

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> d = ClusterSpec.preset("dgx-a100-80gb").device
    >>> round(matmul_efficiency(1e12, d), 3)
    0.699
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.schema.cluster import DeviceSpec
from autoplan.schema.profile import LayerProfile

# Backward of elementwise ops moves about twice the forward's bytes.
BACKWARD_ELEMENTWISE_FACTOR = 2.0

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}

FLOAT8_MATMUL_EFFICIENCY = 0.85
"""Share of the float8 peak a float8 Linear reaches relative to what a bfloat16 one reaches of
its peak, the scaling casts (amax and cast of input, weight and output gradient; tensorwise
dynamic scaling, torchao) included. Fitted to torchtitan's Llama-3-8B FSDP 8xH100 rows
(6,667 -> 8,532 tokens/s/GPU, tests/data/torchtitan_float8.json) and checked on its 128-GPU
rows (tests/unit/test_float8.py)."""


@dataclass(frozen=True)
class LayerTime:
    """Seconds for one micro-batch through one layer on one device (no communication)."""

    forward_s: float
    backward_s: float
    recompute_s: float

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.recompute_s


def matmul_efficiency(flops: float, device: DeviceSpec) -> float:
    """Achievable share of peak for `flops` of matmul work (saturating curve)."""
    return device.matmul_efficiency * flops / (flops + device.matmul_half_efficiency_flops)


def tp_elementwise_share(layer: LayerProfile) -> float:
    """Share of a layer's activations (and elementwise traffic) that tp divides."""
    total = layer.saved_bytes.get("none", 0.0)
    return min(1.0, layer.tp_saved_bytes.get("none", 0.0) / total) if total > 0 else 0.0


def estimate_layer_time(
    layer: LayerProfile,
    device: DeviceSpec,
    *,
    micro_batch_size: int,
    tp: int,
    sequence_parallel: bool,
    recompute: str,
    compute_dtype: str,
    float8_flops_fraction: float = 0.0,
) -> LayerTime:
    """Forward, backward and recompute seconds of `layer` for one micro-batch.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> d = ClusterSpec.preset("dgx-a100-80gb").device
    >>> layer = LayerProfile(name="l", signature="s", param_count=1, fwd_flops=1e12, bwd_flops=2e12,
    ...                      saved_bytes={"none": 0.0}, output_bytes=0.0)
    >>> t = estimate_layer_time(layer, d, micro_batch_size=1, tp=1, sequence_parallel=False,
    ...                         recompute="none", compute_dtype="bfloat16")
    >>> round(t.forward_s * 1e3, 2)   # 1e12 / (312e12 * 0.699)
    4.59
    """
    tp_scale = layer.tp_flops_fraction / tp + (1.0 - layer.tp_flops_fraction)
    op_s = device.op_overhead_us * 1e-6
    if layer.measured_fwd_s is not None and layer.measured_device in (device.name, device.kind):
        measured_fwd_s, measured_bwd_s = layer.measured_micro_batch_s(micro_batch_size)
        # every rank dispatches every op: tp divides the measured time but its host work
        host_fwd_s, host_bwd_s = (
            min(measured_fwd_s, layer.forward_ops * op_s),
            min(measured_bwd_s, layer.backward_ops * op_s),
        )
        forward_s = host_fwd_s + (measured_fwd_s - host_fwd_s) * tp_scale
        backward_s = host_bwd_s + (measured_bwd_s - host_bwd_s) * tp_scale
        elementwise_fwd_s = 0.0
    else:
        scale = micro_batch_size * tp_scale
        fwd_flops, bwd_flops = layer.fwd_flops * scale, layer.bwd_flops * scale
        size = max(fwd_flops, 1.0) / (max(fwd_flops, 1.0) + device.matmul_half_efficiency_flops)
        matmul_s = _matmul_seconds(layer, device, compute_dtype, float8_flops_fraction, size)
        share = tp_elementwise_share(layer)
        split = share / tp + (1.0 - share) / (tp if sequence_parallel else 1)
        elementwise_bytes = (
            layer.elementwise_bytes
            * micro_batch_size
            * split
            * layer.elementwise_bytes_scale(DTYPE_BYTES[compute_dtype])
        )
        bandwidth = device.memory_bandwidth_gbps * 1e9 * device.memory_efficiency
        elementwise_fwd_s = elementwise_bytes / bandwidth
        forward_s = (
            matmul_s(fwd_flops, layer.attention_fwd_flops * scale) + elementwise_fwd_s + layer.forward_ops * op_s
        )
        backward_s = (
            matmul_s(bwd_flops, layer.attention_bwd_flops * scale)
            + BACKWARD_ELEMENTWISE_FACTOR * elementwise_fwd_s
            + layer.backward_ops * op_s
        )
    if recompute == "full":
        recompute_s = forward_s
    elif recompute == "selective":
        recompute_s = elementwise_fwd_s if elementwise_fwd_s else 0.1 * forward_s
    else:
        recompute_s = 0.0
    return LayerTime(forward_s, backward_s, recompute_s)


def _matmul_seconds(layer: LayerProfile, device: DeviceSpec, compute_dtype: str, float8_fraction: float, size: float):
    """seconds(flops, attention_flops) of one pass: `float8_fraction` of `flops` (the Linears')
    at the float8 rate, the attention kernels' `attention_run_fraction` of `attention_flops` at
    `device.attention_efficiency`, the rest at `device.matmul_efficiency`; every rate times the
    size factor `size` = F / (F + matmul_half_efficiency_flops) of the layer's forward FLOPs."""
    peak = device.peak_flops_for(compute_dtype)
    matmul_rate = peak * device.matmul_efficiency * size
    attention_rate = peak * (device.attention_efficiency or device.matmul_efficiency) * size
    float8_rate = (
        device.peak_flops_for("float8_e4m3fn") * FLOAT8_MATMUL_EFFICIENCY * device.matmul_efficiency * size
        if float8_fraction
        else 1.0
    )

    def seconds(flops: float, attention_flops: float) -> float:
        if flops <= 0:
            return 0.0
        attention_flops = min(attention_flops, flops)
        float8_flops = min(float8_fraction * flops, flops - attention_flops)
        other = flops - attention_flops - float8_flops
        return (
            other / matmul_rate
            + float8_flops / float8_rate
            + attention_flops * layer.attention_run_fraction / attention_rate
        )

    return seconds


def linear_flops_fraction(layer: LayerProfile, seq_len: int) -> float:
    """Share of `layer`'s forward FLOPs in its Linear layers: 2 per weight and token (a
    repeated block's parameters are its Linears' weights, but for norms and biases); the rest
    (attention's score and value products) stays in the compute dtype under float8 training.

    >>> layer = LayerProfile(name="b", signature="s", param_count=1000, fwd_flops=4e6, bwd_flops=8e6,
    ...                      saved_bytes={}, output_bytes=0)
    >>> linear_flops_fraction(layer, seq_len=1000)    # 2 * 1000 * 1000 / 4e6
    0.5
    """
    return min(1.0, 2 * seq_len * layer.param_count / layer.fwd_flops) if layer.fwd_flops else 0.0


def estimate_storage_cast_s(
    saved_bytes: float, device: DeviceSpec, storage_dtype: str, compute_dtype: str
) -> tuple[float, float]:
    """(forward, backward) seconds to store `saved_bytes` (in `compute_dtype`) of activations
    as `storage_dtype` and read them back: memory-bound casts of `backends.activation_storage`.
    Forward reads S and writes r S (r = storage / compute bytes), float8 reads S once more for
    its per-tensor scale (amax); backward reads r S and writes S.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> d = ClusterSpec.preset("dgx-a100-80gb").device
    >>> [round(t * 1e6, 1) for t in estimate_storage_cast_s(1e9, d, "float8_e4m3fn", "bfloat16")]   # 2.5 GB, 1.5 GB
    [1532.6, 919.6]
    """
    ratio = DTYPE_BYTES[storage_dtype] / DTYPE_BYTES[compute_dtype]
    scale_pass = 1.0 if storage_dtype == "float8_e4m3fn" else 0.0
    bandwidth = device.memory_bandwidth_gbps * 1e9 * device.memory_efficiency
    return saved_bytes * (1 + scale_pass + ratio) / bandwidth, saved_bytes * (1 + ratio) / bandwidth


def estimate_optimizer_step_s(num_params: float, device: DeviceSpec, param_dtype: str) -> float:
    """Adam over `num_params` local parameters, memory-bound: it reads the fp32 master
    weight, gradient and two moments (16 bytes) and writes master, moments and the
    compute copy (12 + param bytes) — PyTorch's fused Adam moves ~28 + 2 bytes/param
    (`device.adam_bytes_per_param`, which calibration measures on the device).

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> d = ClusterSpec.preset("dgx-a100-80gb").device
    >>> round(estimate_optimizer_step_s(1e9, d, "bfloat16") * 1e3, 1)   # 30e9 B / (2039e9 * 0.8)
    18.4
    """
    extra = DTYPE_BYTES[param_dtype] if param_dtype != "float32" else 0
    moved = num_params * (device.adam_bytes_per_param + extra)
    return moved / (device.memory_bandwidth_gbps * 1e9 * device.memory_efficiency)
