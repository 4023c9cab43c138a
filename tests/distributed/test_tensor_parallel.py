"""Tensor parallelism (and sequence parallelism) trains like one process, and runs
exactly the collectives Megatron-LM's rule says it should."""

from __future__ import annotations

import pytest
import torch

from autoplan.backends.tensor_parallel import fused_row_permutation
from tests.distributed.equivalence import check_equivalence, hand_plan
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks


def test_fused_row_permutation_gives_each_rank_its_q_k_v_rows():
    # q = rows 0-3, k = 4-7, v = 8-11 split over 2 ranks: rank 0 holds q0 q1 k4 k5 v8 v9.
    assert fused_row_permutation([4, 4, 4], 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    # unequal parts (grouped-query attention fused as q | k | v with fewer kv heads)
    assert fused_row_permutation([4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]


# Each call spawns its ranks once (~10 s on 2 cores): plans are grouped per model and world size.


def test_gpt_fused_qkv_tied_embeddings_two_ranks():
    check_equivalence(
        "gpt-tiny",
        [hand_plan("gpt-tiny", 2, tp=2), hand_plan("gpt-tiny", 2, tp=2, sequence_parallel=True, recompute="selective")],
    )


def test_gpt_tensor_parallel_with_data_parallel_four_ranks():
    check_equivalence(
        "gpt-tiny",
        [
            hand_plan("gpt-tiny", 4, dp=2, tp=2, zero_stage=3, sequence_parallel=True),
            hand_plan("gpt-tiny", 4, dp=2, tp=2, recompute="full"),
        ],
    )


def test_llama_grouped_query_attention():
    # llama-tiny: 4 q heads, 2 kv heads -> 2 q and 1 kv head per tp rank.
    check_equivalence(
        "llama-tiny",
        [
            hand_plan("llama-tiny", 2, tp=2, sequence_parallel=True, recompute="full"),
            hand_plan("llama-tiny", 4, dp=2, tp=2, zero_stage=3, recompute="selective"),
        ],
    )


# --------------------------------------------------------------------------- collectives


def _gpt_block_comm_counts(rank: int, world_size: int) -> dict[bool, tuple[dict, str]]:
    """sequence_parallel -> (collectives of one tensor-parallel GPT block forward and backward,
    the placement of a norm weight's gradient)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from autoplan.backends.tensor_parallel import apply_tensor_parallel
    from autoplan.schema.plan import TPSite
    from autoplan.zoo import build

    results = {}
    for sequence_parallel in (False, True):
        gpt = build("gpt-tiny", batch_size=2, device="cpu").module
        block, hidden = gpt.blocks[0], gpt.config.hidden
        # CommDebugMode's module tracker breaks on a module called twice per forward (the
        # block's shared p=0 dropout): swap it for a plain function; it moves no data.
        del block.drop
        block.drop = lambda x: x
        styles = {
            "attn.c_attn": TPSite(style="colwise", fused_sizes=[hidden] * 3),
            "attn.c_proj": TPSite(style="rowwise"),
            "mlp.c_fc": TPSite(style="colwise"),
            "mlp.c_proj": TPSite(style="rowwise"),
            "ln_1": TPSite(style="sequence_parallel"),
            "ln_2": TPSite(style="sequence_parallel"),
            "attn": TPSite(style="colwise_input", input_key=0, num_positional=1),
            "mlp": TPSite(style="colwise_input", input_key=0, num_positional=1),
        }
        apply_tensor_parallel(block, init_device_mesh("cpu", (world_size,)), styles, {}, sequence_parallel)
        x = torch.randn(2, gpt.config.seq_len, hidden)
        if sequence_parallel:  # the block receives its shard of the sequence
            x = x.chunk(world_size, dim=1)[rank]
        with CommDebugMode() as comm_mode:
            block(x.requires_grad_(True)).sum().backward()
        counts = {
            phase: {str(op).split(".")[-1]: n for op, n in comm_mode.comm_module_counts["Global"][phase].items()}
            for phase in ("forward", "backward")
        }
        results[sequence_parallel] = counts, str(getattr(block.ln_1.weight.grad, "placements", None))
    return results


NUM_ROWWISE = 2  # attn.c_proj, mlp.c_proj
NUM_COLWISE_GROUPS = 2  # attn.c_attn (q|k|v), mlp.c_fc


def test_gpt_block_runs_megatron_collectives():
    results = run_ranks(_gpt_block_comm_counts, 2)[0]
    # Megatron-LM (Shoeybi et al. 2019, fig. 3): operator g all-reduces each rowwise output in
    # forward; operator f all-reduces the input gradient of each colwise group in backward.
    counts, _ = results[False]
    assert counts == {"forward": {"all_reduce": NUM_ROWWISE}, "backward": {"all_reduce": NUM_COLWISE_GROUPS}}
    # ... and the cost model charges exactly those collectives: one (seq, hidden) float32
    # tensor per all-reduce that ran, per sequence.
    from autoplan.analysis.profile import profile_model
    from autoplan.zoo import build

    job = build("gpt-tiny", batch_size=2, device="meta")
    block = next(layer for layer in profile_model(job.module, job.example_inputs).layers if layer.name == "blocks.0")
    one_all_reduce_bytes = job.module.config.seq_len * job.module.config.hidden * 4
    assert block.tp_allreduce_bytes_fwd == counts["forward"]["all_reduce"] * one_all_reduce_bytes
    assert block.tp_allreduce_bytes_bwd == counts["backward"]["all_reduce"] * one_all_reduce_bytes
    # Sequence parallelism (Korthikanti et al. 2022): g becomes a reduce-scatter (rowwise outputs)
    # and f an all-gather (colwise group inputs) in forward; in backward each turns into the other.
    counts, norm_grad_placements = results[True]
    assert counts == {
        "forward": {"all_gather_into_tensor": NUM_COLWISE_GROUPS, "reduce_scatter_tensor": NUM_ROWWISE},
        "backward": {"all_gather_into_tensor": NUM_ROWWISE, "reduce_scatter_tensor": NUM_COLWISE_GROUPS},
    }
    # The norms' weight gradients are partial sums over the sequence shards: the one all-reduce
    # Megatron adds for them is pending (DTensor runs it when the gradient is first used).
    assert norm_grad_placements == "(Partial(sum),)"
