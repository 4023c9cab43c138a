"""Checkpoints (`autoplan.backends.checkpoint`): save under one plan, resume under another.

gpt-tiny (fused q|k|v split by tensor parallelism, embedding tied to the head) trains 3
AdamW steps on 4 ranks with dp=2 x tp=2 and saves; the checkpoint then resumes on the
same 4 ranks with ZeRO-3 x tp=2 and on 2 ranks with pp=2 (two virtual stages per rank),
3 more steps each, and every loss matches one process training 6 steps; what pp=2 saves
then loads into tp=2. The same two spawns check an interrupted save, refused checkpoints
(missing, partial, another model's, another optimizer's) and a Hugging Face Llama loaded
from `save_pretrained` into dp=2 x tp=2.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from autoplan import Plan
from autoplan.backends.checkpoint import COMPLETE_MARKER, checkpoint_path, latest_checkpoint
from autoplan.zoo import build
from tests.distributed import equivalence
from tests.distributed.equivalence import ATOL, GLOBAL_BATCH, RTOL, batches, hand_plan, plan_for
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed  # spawns gloo ranks

MODEL = "gpt-tiny"
HF_MODEL = "hf:tests/models/configs/llama.json"
STEPS = 6
SAVED_AT = 3
LR = 1e-2


def _adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR)


def _train(pm, optimizer, steps: range) -> list[float]:
    losses = []
    for inputs, targets in batches(MODEL, steps.stop)[steps.start :]:
        losses.append(pm.train_step(inputs, targets))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _start(plan_json: str, seed: int):
    """The zoo model of the plan, initialised from `seed`, under the plan, with AdamW."""
    from autoplan.backends.runner import apply_plan

    plan = Plan.model_validate_json(plan_json)
    job = build(plan.model_name, batch_size=GLOBAL_BATCH, device="cpu", seed=seed)
    pm = apply_plan(job.module, plan, job.loss_fn, example_inputs=job.example_inputs)
    return pm, _adamw(pm.parameters()), job


def _error(call) -> str:
    try:
        call()
    except Exception as error:  # AutoplanError for refused input; the simulated crash's RuntimeError
        return f"{type(error).__name__}: {error}"
    return "no error"


def _four_ranks(rank: int, world_size: int, root: str, hf_folder: str, plans: dict[str, str]) -> dict:
    """Train and save under dp x tp; an interrupted save; resume under ZeRO-3 x tp; save
    another model's checkpoint; load the Hugging Face folder under dp x tp."""
    from autoplan.backends import checkpoint

    result: dict = {}
    pm, optimizer, _ = _start(plans["save"], seed=0)
    result["saved_losses"] = _train(pm, optimizer, range(0, SAVED_AT))
    pm.save(str(checkpoint_path(root, SAVED_AT)), optimizer=optimizer, step=SAVED_AT)  # SPEC: a plain string

    real_save = checkpoint.dcp.save

    def crash_after_writing(*args, **kwargs):  # every rank dies before the marker and the rename
        real_save(*args, **kwargs)
        raise RuntimeError("killed")

    with mock.patch.object(checkpoint.dcp, "save", crash_after_writing):
        result["interrupted"] = _error(lambda: pm.save(checkpoint_path(root, 6), optimizer=optimizer, step=6))
    result["latest_after_interruption"] = str(latest_checkpoint(root))

    pm, optimizer, _ = _start(plans["resume"], seed=1)
    result["resumed_step"] = pm.load(latest_checkpoint(root), optimizer=optimizer)
    result["resumed_losses"] = _train(pm, optimizer, range(SAVED_AT, STEPS))

    other, _, _ = _start(plans["other"], seed=0)
    other.save(checkpoint_path(Path(root) / "other", 1))

    pm, _, job = _start(plans["hf"], seed=1)
    pm.load_pretrained(hf_folder)
    state = pm.state_dict(full=True)
    with torch.no_grad():
        logits = pm(*job.example_inputs).logits
    if rank == 0:
        result["hf_state"], result["hf_inputs"], result["hf_logits"] = state, job.example_inputs, logits
    return result


def _two_ranks(rank: int, world_size: int, root: str, plans: dict[str, str]) -> dict:
    """Refused loads first (the model must stay as it was), then resume under pp=2 (two
    stages per rank); save there and load that into tp=2: one more step each, alike."""
    pm, optimizer, _ = _start(plans["pp"], seed=1)
    before = {name: value.clone() for name, value in pm.state_dict().items()}
    other = checkpoint_path(Path(root) / "other", 1)
    result = {
        "missing": _error(lambda: pm.load(Path(root) / "step-000042", optimizer=optimizer)),
        "interrupted": _error(lambda: pm.load(Path(root) / "step-000006.tmp", optimizer=optimizer)),
        "no_data_file": _error(lambda: pm.load(Path(root) / "lost-file", optimizer=optimizer)),
        "other_model": _error(lambda: pm.load(other)),
        "no_optimizer_state": _error(lambda: pm.load(other, optimizer=optimizer)),
        "another_optimizer": _error(
            lambda: pm.load(latest_checkpoint(root), optimizer=torch.optim.SGD(pm.parameters()))
        ),
    }
    result["untouched"] = all(torch.equal(before[name], value) for name, value in pm.state_dict().items())
    result["resumed_step"] = pm.load(latest_checkpoint(root), optimizer=optimizer)
    result["resumed_losses"] = _train(pm, optimizer, range(SAVED_AT, STEPS))
    pm.save(checkpoint_path(Path(root) / "pp", STEPS), optimizer=optimizer, step=STEPS)
    tp, tp_optimizer, _ = _start(plans["tp"], seed=2)
    tp.load(checkpoint_path(Path(root) / "pp", STEPS), optimizer=tp_optimizer)
    result["states"] = [{k: v.clone() for k, v in model.state_dict(full=True).items()} for model in (pm, tp)]
    result["next_losses"] = [
        _train(model, opt, range(STEPS, STEPS + 1)) for model, opt in ((pm, optimizer), (tp, tp_optimizer))
    ]
    return result


def _reference_losses() -> list[float]:
    """One process, plain PyTorch, the same AdamW and batches: `equivalence.reference_run`."""
    with mock.patch.object(equivalence, "make_optimizer", _adamw):
        return equivalence.reference_run(MODEL, STEPS)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("checkpoints")
    hf_folder = tmp_path_factory.mktemp("hf") / "llama"
    source = build(HF_MODEL, batch_size=GLOBAL_BATCH, device="cpu", seed=0).module
    source.save_pretrained(hf_folder)
    plans = {
        "save": hand_plan(MODEL, 4, dp=2, tp=2),
        "resume": hand_plan(MODEL, 4, dp=2, tp=2, zero_stage=3),
        "other": hand_plan("mlp-tiny", 4, dp=4),
        "hf": plan_for(HF_MODEL, 4, dp=2, tp=2),
    }
    four = run_ranks(
        _four_ranks, 4, args=(str(root), str(hf_folder), {k: p.model_dump_json() for k, p in plans.items()})
    )
    lost = root / "lost-file"  # whole but for one of DCP's data files
    shutil.copytree(checkpoint_path(root, SAVED_AT), lost)
    next(lost.glob("*.distcp")).unlink()
    two_plans = {
        "pp": hand_plan(MODEL, 2, pp=2, schedule="interleaved_1f1b", virtual_stages=2),
        "tp": hand_plan(MODEL, 2, tp=2),
    }
    two = run_ranks(_two_ranks, 2, args=(str(root), {k: p.model_dump_json() for k, p in two_plans.items()}))
    return {"root": root, "source": source, "four": four, "two": two, "reference": _reference_losses()}


def _assert_losses(losses: list[float], expected: list[float], label: str) -> None:
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(expected), rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}\n{m}"
    )


def test_resume_on_another_plan_and_world_trains_like_one_process(runs):
    """3 steps on dp=2 x tp=2, then 3 on pp=2 x 2 virtual stages (2 ranks) or ZeRO-3 x tp=2
    (4 ranks): the 6 losses of one process."""
    reference = runs["reference"]
    for rank, result in enumerate(runs["four"]):
        _assert_losses(result["saved_losses"], reference[:SAVED_AT], f"rank {rank} before saving")
        assert result["resumed_step"] == SAVED_AT
        _assert_losses(result["resumed_losses"], reference[SAVED_AT:], f"rank {rank} resumed on ZeRO-3 x tp=2")
    for rank, result in enumerate(runs["two"]):
        assert result["resumed_step"] == SAVED_AT
        _assert_losses(result["resumed_losses"], reference[SAVED_AT:], f"rank {rank} resumed on pp=2")


def test_a_pipeline_checkpoint_loads_into_tensor_parallel(runs):
    """Saved from two interleaved stages per rank (each holding one copy of the tied
    embedding), loaded into tp=2: the same full parameters, and the same next step."""
    pipelined, split = runs["two"][0]["states"]
    assert set(pipelined) == set(split)
    for name, value in pipelined.items():
        torch.testing.assert_close(split[name], value, rtol=0, atol=0, msg=name)
    pipelined_loss, split_loss = runs["two"][0]["next_losses"]
    _assert_losses(split_loss, pipelined_loss, "the step after loading a pipeline checkpoint into tp=2")


def test_an_interrupted_save_leaves_the_previous_checkpoint(runs):
    root = runs["root"]
    assert runs["four"][0]["interrupted"] == "RuntimeError: killed"
    assert runs["four"][0]["latest_after_interruption"] == str(checkpoint_path(root, SAVED_AT))
    assert (root / "step-000006.tmp").is_dir() and not (root / "step-000006.tmp" / COMPLETE_MARKER).exists()
    message = runs["two"][0]["interrupted"]
    assert message.startswith(f"AutoplanError: checkpoint {root / 'step-000006.tmp'} is partial: COMPLETE is missing")


def test_latest_checkpoint_takes_the_newest_complete_step(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):
        checkpoint_path(tmp_path, step).mkdir()
        if complete:
            (checkpoint_path(tmp_path, step) / COMPLETE_MARKER).write_text("")
    (tmp_path / "step-000020.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    assert latest_checkpoint(tmp_path / "absent") is None


def test_a_missing_or_partial_checkpoint_names_what_is_missing(runs):
    root, result = runs["root"], runs["two"][0]
    assert result["missing"] == (
        f"AutoplanError: checkpoint {root / 'step-000042'}: no such directory ({root} holds step-000003)"
    )
    assert result["no_data_file"].startswith(f"AutoplanError: checkpoint {root / 'lost-file'} is partial: __")
    assert result["no_data_file"].endswith(".distcp missing (of 4 data files)")


def test_another_models_checkpoint_is_refused_with_the_first_key_before_loading(runs):
    result = runs["two"][0]
    assert result["other_model"] == (
        f"AutoplanError: checkpoint {checkpoint_path(runs['root'] / 'other', 1)} is of another model: "
        "'blocks.0.attn.c_attn.bias' (shape [192]) is in the model but not in the checkpoint; "
        "load a checkpoint saved from this model"
    )
    assert result["no_optimizer_state"].endswith("was saved without optimizer state; load it with optimizer=None")
    assert result["another_optimizer"].startswith(
        f"AutoplanError: checkpoint {checkpoint_path(runs['root'], SAVED_AT)} lacks 'optim.param_groups."
    )
    assert result["another_optimizer"].endswith(
        "it was saved with another kind of optimizer; load it with the same kind, or with optimizer=None"
    )
    assert result["untouched"]


def test_hugging_face_weights_load_into_a_sharded_model(runs):
    source, result = runs["source"], runs["four"][0]
    expected = source.state_dict()
    assert set(result["hf_state"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result["hf_state"][name], value, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        logits = source(*result["hf_inputs"]).logits
    torch.testing.assert_close(result["hf_logits"], logits, rtol=RTOL, atol=ATOL)
