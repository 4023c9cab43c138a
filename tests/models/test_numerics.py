"""Models we did not write train on 4 gloo ranks exactly as in one process (float32, 1e-5):
Hugging Face Llama, GPT-2, Mixtral (experts replicated or sharded, never split by TP) and
BERT (masked LM tied to its embedding) under data parallelism, ZeRO-3 with selective
recompute, tensor parallelism, tensor + sequence parallelism where the trace offers it,
1F1B pipelining and pipeline x tensor parallelism; and for every foreign model, the plan
the planner chooses by itself, so a returned plan that cannot run fails here.

One spawn of 4 ranks per model (~20 s on 2 cores), one for all free choices.
"""

from __future__ import annotations

import pytest

import autoplan
from autoplan.schema.plan import Plan
from autoplan.zoo import build
from tests.distributed.equivalence import GLOBAL_BATCH, check_plans, describe, plan_for
from tests.models.catalog import ALL_MODELS, CONFIGS, short_name

pytestmark = pytest.mark.distributed  # spawns gloo ranks

pytest.importorskip("transformers")

WORLD = 4
MATRIX = {
    "dp": dict(dp=4, zero_stage=0),
    "zero3+selective": dict(dp=4, zero_stage=3, recompute="selective"),
    "tp": dict(dp=2, tp=2, zero_stage=0, sequence_parallel=False),
    "tp+sp": dict(dp=2, tp=2, zero_stage=3, sequence_parallel=True),
    "pp-1f1b": dict(dp=2, pp=2, schedule="1f1b"),
    "pp x tp": dict(pp=2, tp=2, schedule="1f1b"),
}
SEQUENCE_PARALLEL = {"llama", "gpt2"}
"""Models whose trace finds a sequence-parallel region (entry and exit around the blocks);
for the others the planner refuses sequence_parallel=True (tests/models/test_plans.py)."""


def _hf(name: str) -> str:
    return f"hf:{CONFIGS / name}.json"


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "bert"])
def test_numerics_matrix_matches_one_process(name):
    plans = [
        plan_for(_hf(name), WORLD, **pins)
        for label, pins in MATRIX.items()
        if label != "tp+sp" or name in SEQUENCE_PARALLEL
    ]
    assert [plan.mesh for plan in plans][:3] == [{"dp": 4, "pp": 1, "tp": 1}] * 2 + [{"dp": 2, "pp": 1, "tp": 2}]
    tp_plans = [plan for plan in plans if plan.mesh["tp"] > 1]
    assert all(plan.tp_styles for plan in tp_plans), "a tp plan that splits nothing"
    if name == "mixtral":  # attention split, experts whole (expert parallelism comes later)
        assert not any(".experts" in path for plan in tp_plans for path in plan.tp_styles)
    assert any(plan.sequence_parallel for plan in plans) == (name in SEQUENCE_PARALLEL)
    check_plans(plans)


def _free_plan(model: str) -> Plan:
    job = build(model, batch_size=GLOBAL_BATCH, device="meta")
    return autoplan.plan(
        job.module,
        autoplan.ClusterSpec.local(world_size=WORLD),
        job.example_inputs,
        loss_fn=job.loss_fn,
        model_name=model,
    )


def test_the_planners_free_choice_runs_for_every_foreign_model():
    plans = [_free_plan(model) for model in ALL_MODELS]
    assert len({short_name(plan.model_name) for plan in plans}) == len(ALL_MODELS)
    print("\n".join(describe(plan) for plan in plans))
    check_plans(plans)
