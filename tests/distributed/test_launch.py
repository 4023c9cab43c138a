"""`autoplan.runtime.launch` through torch's own launcher: real processes, real gloo."""

import json
import re

import pytest

from autoplan.runtime.launch import launch
from tests.distributed.equivalence import hand_plan

pytestmark = pytest.mark.distributed  # starts ranks through torchrun


def test_two_rank_launch_writes_a_result_with_per_rank_memory(tmp_path):
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "result.json"
    hand_plan("gpt-tiny", 2, dp=2).to_json(plan_path)
    result = launch(plan_path, "gpt-tiny", nproc=2, steps=2, out_path=out_path)
    assert json.loads(out_path.read_text()) == result
    assert result["world_size"] == 2 and result["mesh"] == {"dp": 2, "pp": 1, "tp": 1}
    assert len(result["step_times_s"]) == 2 and result["median_step_s"] > 0
    assert len(result["peak_memory_bytes"]) == 2
    # gpt-tiny: 4 layers, h=64, vocab 128, 32 positions -> ~0.2 M params; replicated data
    # parallel keeps weights + grads + two AdamW states of all of them on every rank
    from autoplan.zoo import build

    param_bytes = sum(p.numel() * 4 for p in build("gpt-tiny", device="meta").module.parameters())
    assert all(4 * param_bytes <= peak < 20 * param_bytes for peak in result["peak_memory_bytes"])
    assert result["losses"][-1] < result["losses"][0]


def test_a_corrupt_plan_is_a_value_error_before_anything_starts(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"version": 1, "mesh": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        launch(path, "gpt-tiny", nproc=2)
    with pytest.raises(ValueError, match="does not exist"):
        launch(tmp_path / "missing.json", "gpt-tiny", nproc=2)


def test_nproc_must_match_the_plan(tmp_path):
    path = tmp_path / "plan.json"
    hand_plan("gpt-tiny", 2, dp=2).to_json(path)
    with pytest.raises(ValueError, match=r"nproc\(3\) \* nnodes\(1\) = 3 != the plan's world size"):
        launch(path, "gpt-tiny", nproc=3)


def test_a_failing_job_raises_one_line_per_rank_not_a_traceback(tmp_path):
    path = tmp_path / "plan.json"
    hand_plan("gpt-tiny", 2, dp=2).to_json(path)
    with pytest.raises(RuntimeError) as error:
        launch(path, "no-such-model", nproc=2, steps=1, timeout_s=120)
    message = str(error.value)
    # one line for every rank that printed before the launcher stopped the others
    assert re.search(r"ranks? [01](,[01])?: ValueError: unknown model 'no-such-model'", message), message
    assert message.count("unknown model") == 1
    assert "Traceback" not in message


def test_rank_errors_are_grouped_even_when_their_lines_interleave():
    from autoplan.runtime.launch import _describe_failure

    stderr = (
        "noise\nautoplan.worker: rank 2: ValueError: tp=3 does not divide 4"
        "autoplan.worker: rank 3: ValueError: tp=3 does not divide 4\n"
        "Traceback (most recent call last):\nautoplan.worker: rank 0: KeyError: 'x'\n"
    )
    assert _describe_failure(1, stderr) == (
        "failed (exit code 1): ranks 2,3: ValueError: tp=3 does not divide 4; rank 0: KeyError: 'x'"
    )
