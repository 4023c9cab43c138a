"""apply_plan / ParallelModel: errors a user can make, the model-facing API, bf16."""

from __future__ import annotations

import math
import re

import pytest

from tests.distributed.equivalence import GLOBAL_BATCH, hand_plan
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks


def _exercise_runner(rank: int, world_size: int) -> dict:
    """Several runner checks sharing one spawn of 2 ranks."""
    import torch
    from torch.distributed.tensor import DTensor

    from autoplan.backends.runner import apply_plan
    from autoplan.zoo import build

    result = {}
    job = build("gpt-tiny", batch_size=GLOBAL_BATCH, device="cpu")
    try:
        apply_plan(job.module, hand_plan("gpt-tiny", 4, dp=2, tp=2), job.loss_fn)
    except ValueError as error:
        result["world_size_error"] = str(error)

    plan = hand_plan("gpt-tiny", 2, dp=1, tp=2, recompute="full")
    original_names = set(job.module.state_dict())
    model = apply_plan(job.module, plan, job.loss_fn)
    result["parameter_names_are_original"] = {name for name, _ in model.named_parameters()} <= original_names
    result["split_parameters"] = sorted(
        name
        for name, param in model.named_parameters()
        if isinstance(param, DTensor) and param.to_local().shape != param.shape
    )
    result["loss"] = model.train_step(job.example_inputs, job.targets)
    result["full_keys_are_original"] = set(model.state_dict(full=True)) == original_names
    try:
        model.train_step(job.example_inputs[0][:3], targets=job.targets[:3])
    except ValueError as error:
        result["batch_error"] = str(error)

    for zero_stage in (0, 2):  # bf16 parameters through replicate's and fully_shard's policy
        job = build("gpt-tiny", batch_size=GLOBAL_BATCH, device="cpu")
        plan = hand_plan("gpt-tiny", 2, dp=2, zero_stage=zero_stage).model_copy(update={"param_dtype": "bfloat16"})
        model = apply_plan(job.module, plan, job.loss_fn)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        result[f"bf16_zero{zero_stage}_loss"] = model.train_step(job.example_inputs, job.targets)
        optimizer.step()
        result[f"bf16_zero{zero_stage}_master_dtype"] = str(next(model.parameters()).dtype)

    # Rank 1 leaves (the harness tears its process group down); rank 0's next step must fail, not hang.
    if rank == 0:
        try:
            model.train_step(job.example_inputs, job.targets)
        except Exception as error:  # gloo: the peer closed the connection; NCCL: the group's timeout
            result["dead_peer_error"] = f"{type(error).__name__}: {error}"
            result["dead_peer_error_is_runtime_error"] = isinstance(error, RuntimeError)  # DistBackendError too
    return result


@pytest.fixture(scope="module")
def runner_results() -> list[dict]:
    return run_ranks(_exercise_runner, 2)


def test_wrong_world_size_names_both_numbers(runner_results):
    assert runner_results[0]["world_size_error"] == "plan mesh dp(2) * pp(1) * tp(2) = 4 != world size 2"


def test_parallel_model_keeps_the_original_names(runner_results):
    result = runner_results[0]
    assert result["parameter_names_are_original"] and result["full_keys_are_original"]
    assert "blocks.0.attn.c_attn.weight" in result["split_parameters"]
    assert "tok_emb.weight" in result["split_parameters"]


def test_loss_is_the_same_float_on_every_rank(runner_results):
    assert runner_results[0]["loss"] == runner_results[1]["loss"]
    assert abs(runner_results[0]["loss"] - math.log(128)) < 0.5  # gpt-tiny starts near ln(vocab)


def test_a_batch_that_does_not_match_the_plan_is_a_value_error(runner_results):
    # hand_plan: micro_batch_size = 8 // (dp * 2) = 4 sequences, 2 micro-batches
    assert (
        runner_results[0]["batch_error"]
        == "global batch of 3 != micro_batch_size(4) * num_micro_batches(2) * dp(1) = 8"
    )


def test_bfloat16_runs_with_finite_loss_and_float32_master_weights(runner_results):
    for zero_stage in (0, 2):
        assert math.isfinite(runner_results[0][f"bf16_zero{zero_stage}_loss"])
        assert runner_results[0][f"bf16_zero{zero_stage}_master_dtype"] == "torch.float32"


def test_a_rank_that_leaves_fails_the_others_instead_of_hanging(runner_results):
    # gloo's TCP transport sees the departed peer's socket close and raises at once, rather than
    # waiting out the process group's 60 s timeout (a hang would fail run_ranks after its own
    # timeout_s): the error names the closed connection, not a timeout.
    assert runner_results[0].get("dead_peer_error_is_runtime_error"), runner_results[0].get("dead_peer_error")
    message = runner_results[0]["dead_peer_error"]
    assert re.search(r"(closed|reset) by peer|Broken pipe", message), message
    assert "timed out" not in message.lower() and "timeout" not in message.lower(), message
