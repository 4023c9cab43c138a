"""Pipeline parallelism trains like one process, through `apply_plan`, on real gloo ranks.

Every schedule (gpipe, 1f1b, interleaved 1f1b), composed with data parallel (ZeRO 0 and
3), tensor parallel (with and without sequence parallelism) and recompute (full and
selective), on gpt-tiny (embedding tied across the first and last stage), llama-tiny and
mlp-tiny. Plans are grouped per world size: one spawn of processes each.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from autoplan import Plan
from autoplan.backends.pipeline import validate_pipeline_plan
from autoplan.backends.pipeline_split import split_model
from autoplan.zoo import build
from tests.distributed.equivalence import ATOL, GLOBAL_BATCH, RTOL, check_equivalence, hand_plan
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks

SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


def _pipeline_plans(job_name: str) -> list[Plan]:
    """Every schedule on 2 ranks; pp=4, pp x dp (ZeRO 0 and 3) and pp x tp on 4 ranks."""
    plans = [
        hand_plan(job_name, 2, pp=2, schedule="gpipe"),
        hand_plan(job_name, 2, pp=2, schedule="1f1b", recompute="full"),
        hand_plan(job_name, 2, pp=2, schedule="interleaved_1f1b", virtual_stages=2, recompute="selective"),
        hand_plan(job_name, 4, pp=4, schedule="1f1b"),
        hand_plan(job_name, 4, pp=2, dp=2, schedule="1f1b", zero_stage=0),
        hand_plan(job_name, 4, pp=2, dp=2, schedule="interleaved_1f1b", virtual_stages=2, zero_stage=3),
    ]
    if job_name == "gpt-tiny":  # the tied embedding is vocab-split on both stages; fused q|k|v
        plans += [
            hand_plan(job_name, 4, pp=2, tp=2, schedule="gpipe", recompute="selective"),
            hand_plan(job_name, 4, pp=2, tp=2, schedule="1f1b", sequence_parallel=True),
        ]
    elif job_name == "llama-tiny":  # grouped-query attention split over tp
        plans += [hand_plan(job_name, 4, pp=2, tp=2, schedule="interleaved_1f1b", virtual_stages=2)]
    return plans


@pytest.mark.parametrize("job_name", ["gpt-tiny", "llama-tiny", "mlp-tiny"])
def test_pipeline_trains_like_one_process(job_name):
    check_equivalence(job_name, _pipeline_plans(job_name))


def _schedules_that_ran(rank: int, world_size: int, plan_jsons: list[str]):
    from autoplan.backends.runner import apply_plan

    ran = []
    for plan_json in plan_jsons:
        plan = Plan.model_validate_json(plan_json)
        job = build(plan.model_name, batch_size=GLOBAL_BATCH, device="cpu", seed=0)
        schedule = apply_plan(job.module, plan, job.loss_fn, example_inputs=job.example_inputs).engine.schedule
        ran.append((type(schedule).__name__, [str(a) for a in schedule.pipeline_order[rank] if a is not None]))
    return ran


def test_the_plans_schedule_is_the_one_that_runs():
    """The torch schedule class is the plan's, and its action list ("2F1": stage 2, forward,
    micro-batch 1) has the plan's shape. For interleaved 1F1B the list is what executes."""
    configs = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]
    plans = [hand_plan("mlp-tiny", 2, pp=2, schedule=schedule, virtual_stages=v) for schedule, v in configs]
    per_rank = run_ranks(_schedules_that_ran, 2, args=([plan.model_dump_json() for plan in plans],))
    for index, plan in enumerate(plans):
        n = plan.num_micro_batches
        for rank in range(2):
            class_name, actions = per_rank[rank][index]
            assert class_name == SCHEDULE_CLASSES[plan.schedule]
            if plan.schedule == "interleaved_1f1b":
                forwards = [action for action in actions if re.fullmatch(r"\d+F\d+", action)]
                stages = [stage.index for stage in plan.stages_of_rank(rank)]
                assert sorted(forwards) == sorted(f"{stage}F{mb}" for stage in stages for mb in range(n))
                # interleaved, not stage after stage: the later local stage starts before the first ends
                assert forwards.index(f"{stages[1]}F0") < forwards.index(f"{stages[0]}F{n - 1}")
        first_rank = per_rank[0][index][1]
        first_backward = next(i for i, action in enumerate(first_rank) if "B" in action)
        warmup = {
            "gpipe": [f"0F{mb}" for mb in range(n)],  # every forward, then backwards
            "1f1b": ["0F0", "0F1"],  # pp = 2 forwards, then 1F1B
            "interleaved_1f1b": ["0F0", "0F1", "2F0", "2F1", "0F2"],
        }[plan.schedule]
        assert first_rank[:first_backward] == warmup


class _TwoInputNet(torch.nn.Module):
    """Not a zoo model: two inputs; the last stage reads a model input again and indexes an
    embedding with positions made on the first stage."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.pos = torch.nn.Embedding(5, 8)
        self.c = torch.nn.Linear(8, 3)

    def forward(self, tokens, scale):
        positions = torch.arange(tokens.shape[1])
        h = self.b(self.a(self.emb(tokens))) * scale + self.pos(positions)
        return self.c(h).mean(1) + (tokens == 0).float().sum(-1, keepdim=True)


def _two_input_net_on_rank(rank: int, world_size: int):
    from autoplan import ClusterSpec
    from autoplan.backends.runner import apply_plan
    from autoplan.schema.plan import LayerChoice, Prediction, StagePlan

    stages = [["emb"], ["a"], ["b", "pos", "c"]]  # tokens, scale, positions travel through stage 1
    batch = {"global_batch_size": 6, "micro_batch_size": 2, "num_micro_batches": 3}
    plan = Plan(
        mesh={"dp": 1, "pp": 3, "tp": 1},
        **batch,
        stages=[StagePlan(index=i, pp_rank=i, layers=names) for i, names in enumerate(stages)],
        layers=[LayerChoice(name=name, stage=i) for i, names in enumerate(stages) for name in names],
        predicted=Prediction(step_time_s=0.0, peak_memory_bytes=0.0),
        cluster=ClusterSpec.local(world_size=3),
    )
    torch.manual_seed(0)
    model, generator = _TwoInputNet(), torch.Generator().manual_seed(1)
    inputs = (torch.randint(0, 10, (6, 5), generator=generator), torch.randn(6, 5, 8, generator=generator))
    targets = torch.randn(6, 3, generator=generator)
    reference = copy.deepcopy(model)
    expected_loss = torch.nn.functional.mse_loss(reference(*inputs), targets)
    expected_loss.backward()
    expected_grads = {name: p.grad for name, p in reference.named_parameters()}
    parallel = apply_plan(model, plan, torch.nn.functional.mse_loss, example_inputs=inputs)
    loss = parallel.train_step(inputs, targets)
    return loss, expected_loss.item(), {name: (p.grad, expected_grads[name]) for name, p in parallel.named_parameters()}


def test_a_value_used_two_stages_later_is_passed_through():
    for loss, expected_loss, grads in run_ranks(_two_input_net_on_rank, 3):
        assert loss == pytest.approx(expected_loss, rel=RTOL)
        for name, (grad, expected) in grads.items():
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_split_keeps_original_names_and_passes_values_through_stages():
    job = build("gpt-tiny", batch_size=2, device="cpu")
    plan = hand_plan("gpt-tiny", 4, pp=4)
    split = split_model(job.module, [stage.layers for stage in plan.stages])
    names = [name for module in split.stage_modules for name, _ in module.named_parameters()]
    assert set(names) == set(job.module.state_dict())  # tok_emb.weight on stage 0, lm_head.weight on stage 3
    assert split.tied_groups == [["tok_emb.weight", "lm_head.weight"]]
    assert split.holders(["tok_emb.weight", "lm_head.weight"]) == [0, 3]
    values = job.example_inputs
    for module in split.stage_modules:
        values = module(*values)
        values = values if isinstance(values, tuple) else (values,)
    torch.testing.assert_close(values[0], job.module(*job.example_inputs))


def test_schedule_constraints_are_value_errors_with_the_numbers():
    plan = hand_plan("mlp-tiny", 4, pp=4, schedule="1f1b", micro_batch_size=4)  # 2 micro-batches, pp=4
    with pytest.raises(ValueError, match=r"num_micro_batches >= pp: 2 < 4"):
        validate_pipeline_plan(plan)
    plan = hand_plan("mlp-tiny", 2, pp=2, schedule="1f1b", virtual_stages=2)
    with pytest.raises(ValueError, match="virtual_stages=2"):
        validate_pipeline_plan(plan)
    plan = hand_plan("mlp-tiny", 4, pp=4, schedule="interleaved_1f1b", virtual_stages=1, micro_batch_size=1)
    validate_pipeline_plan(plan.model_copy(update={"num_micro_batches": 10}))  # 2 rounds of 5
    with pytest.raises(ValueError, match=r"num_micro_batches\(9\) to be a multiple of .* = max\(1, 9 // 4\) = 2"):
        validate_pipeline_plan(plan.model_copy(update={"num_micro_batches": 9}))
