"""Per-device memory of a plan, in bytes.

Model states per local parameter (mixed precision as Megatron-LM counts it,
Narayanan et al. SC21 / Rajbhandari et al. ZeRO 2020):
    param_dtype = bfloat16/float16: 2 (param) + 4 (fp32 gradient accumulator)
                                    + 4 (fp32 master) + 8 (Adam m, v)  = 18 bytes
    param_dtype = float32:          4 (param) + 4 (grad) + 8 (Adam)     = 16 bytes
ZeRO, as the backend implements it with FSDP2:
    0: everything replicated over dp.
    1, 2: `fully_shard(reshard_after_forward=False)`: gradients, master weights and
       Adam states sharded over dp; the unsharded parameters stay resident for the
       whole forward/backward. Both stages are charged the same.
    3: `fully_shard(reshard_after_forward=True)`: everything sharded over dp, plus the
       all-gathered parameters of the two largest layers (current + prefetched).

Activations kept for backward, per micro-batch on one device:
    saved_bytes[option] * b * scale, with the tp share divided by t and the
    rest divided by t only under sequence parallelism (Korthikanti et al. 2022); scale is 1 in
float32 and, in a 16-bit dtype, the layer's own measured share (`LayerProfile.saved_bytes_scale`:
what its bfloat16 meta run keeps, float32 logits of the loss and norm statistics included).
In-flight micro-batches on pipeline rank i of p with m micro-batches:
    GPipe: m;  1F1B: min(p - i, m);
    interleaved 1F1B with v chunks: min(m, (p - i) * (1 + (p - 1) / (p * v))) rank-worths
    (Korthikanti et al. 2022, section 4.2.3: the first stage holds p*(1 + (p-1)/(pv))
    micro-batches of its layers; we scale the same factor for later ranks).
Plus, once per device: framework overhead, the largest communication buffer, and the
transient working memory of the largest layer's backward (its "none" saved bytes for
one micro-batch, tp-split, as the recomputed/temporary tensors of that layer, and its
output's gradient). On CUDA the caching allocator reserves `allocator_reserve_fraction`
more than all of these but the framework overhead (`allocator_reserve_bytes`).
"""

from __future__ import annotations

from autoplan.costmodels.compute import DTYPE_BYTES
from autoplan.schema.profile import LayerProfile

ADAM_BYTES = 8
"""Two fp32 moments per parameter."""
GRAD_ACCUMULATOR_BYTES = 4
"""Gradients accumulate in fp32 (Megatron's main_grad; float32 training: the grad itself)."""


def model_state_bytes_per_param(param_dtype: str) -> dict[str, float]:
    """Bytes per parameter of each model-state term, before sharding.

    >>> sum(model_state_bytes_per_param("bfloat16").values())
    18
    >>> sum(model_state_bytes_per_param("float32").values())
    16
    """
    return {
        "params_bytes": DTYPE_BYTES[param_dtype],
        "grads_bytes": GRAD_ACCUMULATOR_BYTES,
        "master_weights_bytes": 4 if param_dtype != "float32" else 0,
        "optimizer_states_bytes": ADAM_BYTES,
    }


def estimate_model_state_bytes(num_params: float, *, zero_stage: int, dp: int, param_dtype: str) -> dict[str, float]:
    """Model-state bytes of `num_params` local (tp-split) parameters per device.

    >>> estimate_model_state_bytes(1e9, zero_stage=1, dp=4, param_dtype="bfloat16")["params_bytes"]
    2000000000.0
    >>> estimate_model_state_bytes(1e9, zero_stage=3, dp=4, param_dtype="bfloat16")["params_bytes"]
    500000000.0
    """
    terms = model_state_bytes_per_param(param_dtype)
    sharded = set() if zero_stage == 0 else set(terms) - ({"params_bytes"} if zero_stage < 3 else set())
    return {name: num_params * per / (dp if name in sharded else 1) for name, per in terms.items()}


def local_param_count(layer: LayerProfile, tp: int) -> float:
    """Parameters of `layer` held by one tp rank."""
    return layer.tp_param_count / tp + (layer.param_count - layer.tp_param_count)


def estimate_activation_bytes(
    layer: LayerProfile,
    recompute: str,
    *,
    micro_batch_size: int,
    tp: int,
    sequence_parallel: bool,
    activation_dtype: str,
) -> float:
    """Bytes `layer` keeps for backward for one micro-batch on one device.

    >>> layer = LayerProfile(name="l", signature="s", param_count=0, fwd_flops=0, bwd_flops=0,
    ...     saved_bytes={"none": 100.0}, tp_saved_bytes={"none": 60.0}, output_bytes=0)
    >>> estimate_activation_bytes(layer, "none", micro_batch_size=2, tp=2, sequence_parallel=False,
    ...                           activation_dtype="bfloat16")    # (60/2 + 40) * 2 * 2/4
    70.0
    """
    saved = layer.saved_bytes[recompute]
    tp_part = min(layer.tp_saved_bytes.get(recompute, 0.0), saved)
    per_sequence = tp_part / tp + (saved - tp_part) / (tp if sequence_parallel else 1)
    return per_sequence * micro_batch_size * layer.saved_bytes_scale(recompute, DTYPE_BYTES[activation_dtype])


def in_flight_micro_batches(
    schedule: str, pp_rank: int, pp: int, num_micro_batches: int, virtual_stages: int = 1
) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak.

    >>> in_flight_micro_batches("1f1b", 0, 4, 8), in_flight_micro_batches("gpipe", 0, 4, 8)
    (4, 8)
    >>> in_flight_micro_batches("interleaved_1f1b", 0, 4, 8, virtual_stages=2)   # 4 * (1 + 3/8)
    5.5
    """
    m = num_micro_batches
    if schedule == "gpipe":
        return m
    if schedule == "interleaved_1f1b" and virtual_stages > 1:
        return min(m, (pp - pp_rank) * (1 + (pp - 1) / (pp * virtual_stages)))
    return min(pp - pp_rank, m)


def estimate_transient_bytes(
    layers: list[LayerProfile],
    *,
    micro_batch_size: int,
    tp: int,
    activation_dtype: str,
    sequence_parallel: bool = False,
) -> float:
    """Working memory of the largest layer's backward: its "none" saved bytes once (tp share
    split, no sequence-parallel split: the gathered tensors are full) and the gradient of its
    output arriving from the layer after it (split over tp with sequence parallelism or a
    vocabulary-split output head). For the last layer that output is the loss's input: its
    logits' gradient, beside the loss's float32 working copies (saved bytes)."""
    scale = micro_batch_size * DTYPE_BYTES[activation_dtype] / 4
    return max(
        (
            estimate_activation_bytes(
                layer,
                "none",
                micro_batch_size=micro_batch_size,
                tp=tp,
                sequence_parallel=False,
                activation_dtype=activation_dtype,
            )
            + layer.output_bytes * scale / (tp if sequence_parallel or _splits_output(layer) else 1)
            for layer in layers
        ),
        default=0.0,
    )


def _splits_output(layer: LayerProfile) -> bool:
    return any(site.style == "vocab_output" for site in layer.tp_sites.values())


def allocator_reserve_bytes(terms: dict[str, float], fraction: float) -> float:
    """What the caching allocator holds beyond the tensors of `terms` (all but the framework's
    own overhead).

    >>> allocator_reserve_bytes({"params_bytes": 100.0, "framework_overhead_bytes": 50.0}, 0.08)
    8.0
    """
    return fraction * sum(v for name, v in terms.items() if name != "framework_overhead_bytes")


def estimate_zero3_gathered_bytes(layers: list[LayerProfile], *, tp: int, param_dtype: str) -> float:
    """ZeRO-3: the unsharded parameters of the two largest layers (current + prefetched)."""
    sizes = sorted((local_param_count(layer, tp) for layer in layers), reverse=True)
    return sum(sizes[:2]) * DTYPE_BYTES[param_dtype]


def estimate_comm_buffer_bytes(
    layers: list[LayerProfile],
    *,
    micro_batch_size: int,
    tp: int,
    dp: int,
    activation_dtype: str,
    ddp_bucket_views: bool = False,
    grad_reduce_dtype: str = "float32",
) -> float:
    """The largest collective buffer: a tp all-reduce of one layer's output, or the data-parallel
    gradient buffer: none with DDP's `gradient_as_bucket_view` (its buckets are the gradients
    themselves); with FSDP2 (ZeRO 1-3, and `replicate` beside tp or pp) one unit's gradients,
    copied flat for the reduce-scatter / all-reduce: the largest layer's local parameters."""
    tp_bytes = 0.0
    if tp > 1:
        tp_bytes = max(max(layer.tp_allreduce_bytes_fwd, layer.tp_allreduce_bytes_bwd) for layer in layers)
        tp_bytes *= micro_batch_size * DTYPE_BYTES[activation_dtype] / 4
    unit_bytes = 0.0
    if dp > 1 and not ddp_bucket_views:
        unit_bytes = max(local_param_count(layer, tp) for layer in layers) * DTYPE_BYTES[grad_reduce_dtype]
    return max(tp_bytes, unit_bytes)
