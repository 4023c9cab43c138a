"""The README's examples run as written: its first Python block (plan, explain, pin) in this
process, and every `autoplan plan`/`show` line of its command-line block. The blocks that need
ranks (parallelize, train_step) are the SPEC calls tests/models/test_contract.py runs on gloo."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from autoplan.cli import main

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, flags=re.S)


def test_the_first_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes plan.json
    language, code = BLOCKS[[kind for kind, _ in BLOCKS].index("python")]
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "plan.json").exists()


def _cli_lines() -> list[str]:
    commands = []
    for language, code in BLOCKS:
        for line in code.splitlines():
            line = line.split("#")[0].strip()
            if language == "bash" and line.startswith(("autoplan plan ", "autoplan show ")):
                commands.append(line)
    return commands


@pytest.mark.parametrize("line", _cli_lines())
def test_every_plan_and_show_line_runs(line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if line.startswith("autoplan show "):  # shows what an earlier line wrote
        assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "-o", shlex.split(line)[2]]) == 0
    if "examples/" in line:
        line = line.replace("examples/", str(Path(__file__).resolve().parents[2] / "examples") + "/")
    if "--profile" in line:
        pytest.skip("needs the profile file an `autoplan profile` line measures")
    assert main(shlex.split(line)[1:]) == 0, capsys.readouterr().err
