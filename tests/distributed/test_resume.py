"""`autoplan run --checkpoint-dir`: a killed rank restarts (torch's elastic agent) and resumes from
the last checkpoint to the parameters of an uninterrupted run; a job on another world size
re-plans and reshards the checkpoint instead of running a plan made for other ranks."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from autoplan.backends.checkpoint import latest_checkpoint
from autoplan.cli import main
from autoplan.runtime.resume import FAIL_AT_STEP_ENV, FAIL_RANK_ENV
from tests.distributed.equivalence import hand_plan

pytestmark = pytest.mark.distributed  # starts ranks through torchrun


def _words(text: str) -> str:
    """`text` with its line breaks (the console wraps at the terminal's width) as spaces."""
    return " ".join(text.split())


def _saved(folder, tmp_path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's model and optimizer tensors, read in this one process."""
    out = tmp_path / f"{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def test_a_killed_rank_restarts_and_resumes_to_an_uninterrupted_runs_parameters(tmp_path, monkeypatch, capsys):
    plan_path = tmp_path / "plan.json"
    hand_plan("gpt-tiny", 2, dp=2).to_json(plan_path)
    common = [str(plan_path), "--steps", "5", "--checkpoint-every", "2"]
    assert main(["run", *common, "--checkpoint-dir", str(tmp_path / "whole")]) == 0
    assert "trained steps 1..5 on 2 rank(s)" in _words(capsys.readouterr().out)

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "4")  # rank 1 dies before step 4: the last checkpoint is step 2
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    argv = ["run", *common, "--checkpoint-dir", str(tmp_path / "killed"), "--max-restarts", "1"]
    assert main(argv) == 0
    out = _words(capsys.readouterr().out)
    assert "trained steps 3..5" in out and "resumed from step 2, restarts 1" in out

    whole, killed = (latest_checkpoint(tmp_path / name) for name in ("whole", "killed"))
    assert whole is not None and killed is not None and whole.name == killed.name == "step-000005"
    expected, resumed = _saved(whole, tmp_path), _saved(killed, tmp_path)
    assert expected.keys() == resumed.keys() and any(key.startswith("model.") for key in expected)
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key


def test_a_job_on_another_world_size_replans_and_reshards(tmp_path, capsys):
    plan_path, folder = tmp_path / "plan.json", tmp_path / "ckpt"
    hand_plan("gpt-tiny", 2, dp=2).to_json(plan_path)
    assert main(["run", str(plan_path), "--steps", "2", "--checkpoint-dir", str(folder)]) == 0
    capsys.readouterr()
    assert main(["run", str(plan_path), "--nproc", "1", "--steps", "3", "--checkpoint-dir", str(folder)]) == 0
    out = _words(capsys.readouterr().out)
    assert "trained steps 3..3 on 1 rank(s)" in out and "'dp': 1" in out and "resumed from step 2" in out


def test_without_a_checkpoint_folder_another_world_size_is_refused_before_launch(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    hand_plan("gpt-tiny", 2, dp=2).to_json(plan_path)
    assert main(["run", str(plan_path), "--nproc", "1", "--steps", "1"]) == 2
    assert "give a checkpoint folder to re-plan for 1" in _words(capsys.readouterr().err)
    assert main(["run", str(plan_path), "--max-restarts", "1"]) == 2
    assert "--max-restarts without --checkpoint-dir" in capsys.readouterr().err
