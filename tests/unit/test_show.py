"""`autoplan show` on a real-size plan: stage rows grouped, layers folded over repeated blocks
(all rows with --layers), time and memory as two tables with units, why this plan, and the
solver's statistics in words."""

from __future__ import annotations

import json
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
    assert any(line.startswith("solver ") for line in text.splitlines()[-2:])


@pytest.fixture(scope="module")
def llama_405b_plan(tmp_path_factory):
    """llama3-405b on 16,384 H100s (2048 nodes), the default global batch."""
    path = tmp_path_factory.mktemp("show") / "llama3-405b.json"
    argv = ["plan", "--model", "llama3-405b", "--cluster", "dgx-h100:2048", "-o", str(path)]
    assert main([*argv, "--fix", "pp=8,tp=8,schedule=interleaved_1f1b,virtual_stages=4"]) == 0
    return path


@pytest.mark.parametrize("plan_fixture", ["big_plan", "llama_405b_plan"])
def test_show_of_a_real_plan_fits_one_100_by_60_screen(plan_fixture, request, capsys):
    path = request.getfixturevalue(plan_fixture)
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines"
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("solver ") for line in lines[-2:])


def test_show_json_is_the_same_report(big_plan, capsys):
    capsys.readouterr()
    assert main(["show", str(big_plan)]) == 0
    text = capsys.readouterr().out
    assert main(["show", str(big_plan), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lines"][0] in text and report["solver"].split(";")[0] in text
    for table in report["tables"]:
        assert table["title"] in text
        for row in table["rows"]:
            assert row[0] in text and row[-1].split()[0] in text


def test_show_lists_precision_choices_with_what_they_save():
    from autoplan import explain
    from tests.distributed.equivalence import plan_for

    exact, lossy = plan_for("gpt-tiny", 1), plan_for("gpt-tiny", 1, activation_dtype="float8_e4m3fn")
    assert "precision:" not in explain(exact)
    rows = _section(explain(lossy), "precision:")
    assert len(rows) == 1 and "blocks.0 .. blocks.3 (4)" in rows[0] and "float8_e4m3fn" in rows[0]
    saved_gb = sum(layer.precision_saved_bytes for layer in lossy.layers) / 1e9
    assert f"{saved_gb:,.3f} GB" in rows[0] and " ms" in rows[0]
    assert {layer.activation_dtype for layer in lossy.layers} == {"float32", "float8_e4m3fn"}
