"""Memory terms against hand arithmetic (Korthikanti et al. 2022 for activations)."""

from __future__ import annotations

import pytest

from autoplan.costmodels.memory import (
    estimate_activation_bytes,
    estimate_model_state_bytes,
    estimate_zero3_gathered_bytes,
    in_flight_micro_batches,
)
from autoplan.costmodels.pipeline import estimate_step
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.parallel import ParallelConfig
from autoplan.schema.profile import LayerProfile, ModelProfile

S, H, A = 2048, 4096, 32  # sequence, hidden, heads
ATTN = 5 * A * S / H  # the 5as/h term


def gpt_block(name: str = "blocks.0") -> LayerProfile:
    """Saved bytes at float32 = 2x Korthikanti's 16-bit counts per sequence."""
    return LayerProfile(
        name=name,
        signature="block",
        param_count=12 * H * H,
        tp_param_count=12 * H * H,
        fwd_flops=24 * S * H * H,
        bwd_flops=48 * S * H * H,
        tp_flops_fraction=1.0,
        saved_bytes={"none": 2 * S * H * (34 + ATTN), "selective": 2 * S * H * 34, "full": 4 * S * H},
        tp_saved_bytes={"none": 2 * S * H * (24 + ATTN), "selective": 2 * S * H * 24, "full": 0.0},
        output_bytes=4 * S * H,
    )


def activation(recompute: str, tp: int, sp: bool, b: int = 2) -> float:
    return estimate_activation_bytes(
        gpt_block(), recompute, micro_batch_size=b, tp=tp, sequence_parallel=sp, activation_dtype="bfloat16"
    )


def test_activation_no_parallelism_is_korthikanti_eq1():
    assert activation("none", 1, False) == pytest.approx(S * 2 * H * (34 + 5 * A * S / H))


@pytest.mark.parametrize("t", [2, 4, 8])
def test_activation_tensor_parallel(t):
    assert activation("none", t, False) == pytest.approx(S * 2 * H * (10 + 24 / t + 5 * A * S / (H * t)))


@pytest.mark.parametrize("t", [2, 8])
def test_activation_tensor_and_sequence_parallel(t):
    assert activation("none", t, True) == pytest.approx(S * 2 * H * (34 / t + 5 * A * S / (H * t)))


def test_activation_selective_recompute_with_sp():
    assert activation("selective", 8, True) == pytest.approx(S * 2 * H * 34 / 8)


def test_activation_full_recompute():
    assert activation("full", 8, False) == pytest.approx(2 * S * 2 * H)


def test_activation_float32_doubles_bf16():
    fp32 = estimate_activation_bytes(
        gpt_block(), "none", micro_batch_size=1, tp=1, sequence_parallel=False, activation_dtype="float32"
    )
    assert fp32 == pytest.approx(2 * S * H * (34 + ATTN))


def test_model_states_mixed_precision_18_bytes():
    terms = estimate_model_state_bytes(1e9, zero_stage=0, dp=8, param_dtype="bfloat16")
    assert terms == {
        "params_bytes": 2e9,
        "grads_bytes": 4e9,
        "master_weights_bytes": 4e9,
        "optimizer_states_bytes": 8e9,
    }


def test_model_states_float32_16_bytes():
    assert sum(estimate_model_state_bytes(1e9, zero_stage=0, dp=1, param_dtype="float32").values()) == 16e9


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_1_and_2_shard_everything_but_params(zero):
    terms = estimate_model_state_bytes(1e9, zero_stage=zero, dp=8, param_dtype="bfloat16")
    assert terms["params_bytes"] == 2e9
    sharded = terms["grads_bytes"] + terms["master_weights_bytes"] + terms["optimizer_states_bytes"]
    assert sharded == pytest.approx(16e9 / 8)


def test_zero3_shards_everything_plus_two_gathered_layers():
    states = estimate_model_state_bytes(1e9, zero_stage=3, dp=8, param_dtype="bfloat16")
    assert sum(states.values()) == pytest.approx(18e9 / 8)
    layers = [gpt_block(), gpt_block("blocks.1"), gpt_block("blocks.2")]
    assert estimate_zero3_gathered_bytes(layers, tp=2, param_dtype="bfloat16") == 2 * (12 * H * H / 2) * 2


def test_in_flight_micro_batches():
    assert [in_flight_micro_batches("1f1b", i, 4, 16) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches("1f1b", 0, 4, 2) == 2
    assert in_flight_micro_batches("gpipe", 3, 4, 16) == 16
    # Korthikanti: the first stage holds p (1 + (p-1)/(p v)) = 4 * (1 + 3/16) micro-batches
    assert in_flight_micro_batches("interleaved_1f1b", 0, 4, 16, virtual_stages=4) == pytest.approx(4.75)


def test_rank_memory_by_hand():
    """One rank, 2 blocks, dp=2 ZeRO-1, bf16, 1F1B on pp=1, mbs 1, full recompute."""
    cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=1, devices_per_node=2)
    layers = [gpt_block("blocks.0"), gpt_block("blocks.1")]
    profile = ModelProfile(
        model_name="m",
        layers=layers,
        global_batch_size=4,
        seq_len=S,
        input_bytes=8 * S,
        fingerprint="x",
        num_params=24 * H * H,
        model_flops_per_sequence=0.0,
    )
    config = ParallelConfig(
        mesh={"dp": 2, "pp": 1, "tp": 1},
        micro_batch_size=1,
        num_micro_batches=2,
        zero_stage=1,
        param_dtype="bfloat16",
        grad_reduce_dtype="bfloat16",
    )
    memory = estimate_step(profile, cluster, config, [[(0, "full"), (1, "full")]]).rank_memory[0]
    params = 24 * H * H
    assert memory["params_bytes"] == 2 * params
    assert memory["optimizer_states_bytes"] == pytest.approx(8 * params / 2)
    assert memory["activations_bytes"] == pytest.approx(1 * 2 * (2 * S * H))  # in flight 1, 2 blocks x 2sh
    # largest "none" + its output's gradient (s x h), bf16
    assert memory["transient_bytes"] == pytest.approx(S * H * (34 + ATTN) + 2 * S * H)
    assert memory["framework_overhead_bytes"] == cluster.device.framework_overhead_bytes
    reserve = cluster.device.allocator_reserve_fraction
    tensors = sum(memory.values()) - memory["allocator_reserve_bytes"] - memory["framework_overhead_bytes"]
    assert memory["allocator_reserve_bytes"] == pytest.approx(reserve * tensors)


def test_data_parallel_buffer_is_one_fsdp_unit_or_none_with_ddp_bucket_views():
    from autoplan.costmodels.memory import estimate_comm_buffer_bytes

    layers = [gpt_block("blocks.0"), gpt_block("blocks.1")]
    kwargs = dict(micro_batch_size=1, tp=1, activation_dtype="float32")
    # FSDP2 copies a unit's gradients flat for its reduce-scatter: 12 H^2 fp32 gradients
    assert estimate_comm_buffer_bytes(layers, dp=4, **kwargs) == pytest.approx(12 * H * H * 4)
    assert estimate_comm_buffer_bytes(layers, dp=4, grad_reduce_dtype="bfloat16", **kwargs) == pytest.approx(
        12 * H * H * 2
    )
    # DDP with gradient_as_bucket_view reduces the gradients in place; one rank reduces nothing
    assert estimate_comm_buffer_bytes(layers, dp=4, ddp_bucket_views=True, **kwargs) == 0.0
    assert estimate_comm_buffer_bytes(layers, dp=1, **kwargs) == 0.0
