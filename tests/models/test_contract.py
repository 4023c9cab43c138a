"""SPEC.md's calls, exactly as it writes them, on a Hugging Face model on 2 gloo ranks:

    pm = autoplan.parallelize(model, cluster)            # two arguments: plans at the first train_step
    loss = pm.train_step(inputs, targets)                # targets positional (or targets=...)
    loss_fn = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())   # a ModelOutput
    pm = autoplan.parallelize(model, cluster, example_inputs=(tokens,), loss_fn=loss_fn, plan=None)

Both forms give the single-process loss, on every rank, and the same plan on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autoplan
from autoplan.errors import AutoplanError
from autoplan.zoo import build
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks

pytest.importorskip("transformers")

LLAMA = "hf:tests/models/configs/llama.json"


def _spec_calls_on_rank(rank: int, world_size: int) -> dict:
    cluster = autoplan.ClusterSpec.local(world_size=world_size)
    job = build(LLAMA, batch_size=4, device="cpu", seed=0)
    tokens, targets = job.example_inputs[0], job.targets
    result = {}

    pm = autoplan.parallelize(job.module, cluster)
    try:
        pm.parameters()
    except AutoplanError as error:
        result["early_access"] = str(error)
    loss = pm.train_step(tokens, targets)
    result["lazy_loss"], result["lazy_plan"] = loss, pm.plan.model_dump_json()
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    result["lazy_second_loss"] = pm.train_step(tokens, targets=targets)

    loss_fn = lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten())  # noqa: E731 (SPEC's form)
    model = build(LLAMA, batch_size=4, device="cpu", seed=0).module
    pm = autoplan.parallelize(model, cluster, example_inputs=(tokens,), loss_fn=loss_fn, plan=None)
    result["eager_loss"] = pm.train_step((tokens,), targets)
    return result


def _reference(loss_fn) -> tuple[float, float]:
    """One process: the loss, and the loss after one SGD step (lr 0.1)."""
    job = build(LLAMA, batch_size=4, device="cpu", seed=0)
    tokens, targets = job.example_inputs[0], job.targets
    loss = loss_fn(job.module(tokens), targets)
    loss.backward()
    with torch.no_grad():
        for param in job.module.parameters():
            param -= 0.1 * param.grad
    return loss.item(), loss_fn(job.module(tokens), targets).item()


def test_spec_calls_on_a_hugging_face_model():
    lazy, lazy_second = _reference(lambda out, y: out.logits.float().mean())  # no loss_fn: the output's mean
    eager, _ = _reference(lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten()))
    results = run_ranks(_spec_calls_on_rank, 2, init_process_group=False)
    for result in results:
        assert "call pm.train_step(inputs, targets) once first" in result["early_access"]
        assert result["lazy_loss"] == pytest.approx(lazy, rel=1e-5)
        assert result["lazy_second_loss"] == pytest.approx(lazy_second, rel=1e-5)
        assert result["eager_loss"] == pytest.approx(eager, rel=1e-5)
    assert results[0]["lazy_plan"] == results[1]["lazy_plan"]
