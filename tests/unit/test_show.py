"""`autoplan show` on a real-size plan: stage rows grouped, layers folded over repeated blocks
(all rows with --layers), time and memory as two tables with units, why this plan, and the
solver's statistics in words."""

from __future__ import annotations

import re

import pytest

from autoplan.cli import main


@pytest.fixture(scope="module")
def big_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("show") / "plan.json"
    argv = ["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb:128", "--global-batch-size", "1536"]
    assert main([*argv, "--fix", "pp=16,tp=4,virtual_stages=4,schedule=interleaved_1f1b", "-o", str(path)]) == 0
    return path


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    end = next(i for i in range(start + 3, len(lines)) if lines[i].startswith("└"))
    return [line for line in lines[start + 3 : end] if line.startswith("│")]


def test_show_groups_stages_and_folds_layers(big_plan, capsys):
    capsys.readouterr()
    assert main(["show", str(big_plan)]) == 0
    text = capsys.readouterr().out
    stage_rows = _section(text, "stages")
    assert len(stage_rows) < 16, "64 stages (pp=16 x v=4) should collapse into a few rows"
    assert any(".." in row.split("│")[1] for row in stage_rows)
    folded = _section(text, "per-layer choices")
    assert main(["show", str(big_plan), "--layers"]) == 0
    every = _section(capsys.readouterr().out, "per-layer choices")
    assert len(folded) < len(every)
    assert "global batch 1536 sequences (--global-batch-size) x 2048 tokens" in text
    assert "3,145,728 tokens per step" in text
    assert "time per step, worst rank" in text and "memory, worst rank" in text
    assert re.search(r"┃\s+ms ┃", text) and re.search(r"┃\s+GB ┃", text)  # the unit heads each table
    assert "why this plan" in text
    assert text.splitlines()[-1].startswith("solver ")
