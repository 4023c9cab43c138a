"""The `autoplan` command line, run in-process through its entry point."""

import json
from pathlib import Path

import pytest

from autoplan import Plan
from autoplan.cli import main


def test_plan_then_show(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt2-small",
                "--cluster",
                "dgx-a100-80gb:2",
                "--global-batch-size",
                "64",
                "--seq-len",
                "256",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    plan = Plan.from_json(out)
    assert plan.world_size == 16 and plan.global_batch_size == 64 and plan.seq_len == 256
    assert main(["show", str(out)]) == 0
    report = capsys.readouterr().out
    for heading in ("stages", "per-layer choices", "runners-up"):
        assert heading in report
    assert f"pp={plan.mesh['pp']} x dp={plan.mesh['dp']} x tp={plan.mesh['tp']}" in report


def test_fix_pins_every_axis(tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                "gpt-tiny",
                "--cluster",
                "local:4",
                "--fix",
                "dp=1,pp=2,tp=2,schedule=gpipe",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    plan = Plan.from_json(out)
    assert plan.mesh == {"dp": 1, "pp": 2, "tp": 2} and plan.schedule == "gpipe"


README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--model", "nope-1b", "--cluster", "local:2"], "unknown model 'nope-1b'"),
        (["plan", "--model", "train.py", "--cluster", "local:2"], "give train.py:make_model"),
        (["plan", "--model", f"{README}:make", "--cluster", "local:2"], "README.md' is not a Python file (.py)"),
        (
            ["plan", "--model", "examples/hf/llama3-8b.json", "--cluster", "local:2"],
            "give hf:examples/hf/llama3-8b.json",
        ),
        (["plan", "--model", "gpt-tiny", "--cluster", "local:4", "--fix", "tp=3"], "tp=3"),
        (["plan", "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb:0"], "num_nodes"),
        (
            [
                "plan",
                "--model",
                "gpt-tiny",
                "--cluster",
                "local:4",
                "--global-batch-size",
                "10",
                "--fix",
                "dp=4,micro_batch_size=3",
            ],
            "12",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("autoplan: error:")


def test_show_and_run_refuse_a_corrupt_plan_file_whole(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"version": 1, "mesh": {"dp": 2}}))
    assert main(["show", str(bad)]) == 2
    assert main(["run", str(tmp_path / "missing.json"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "not a valid plan" in err and "does not exist" in err and "Traceback" not in err


def test_plan_file_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:4", "--fix", "tp=3", "-o", str(out)]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_only_launcher_flags_pass_through_to_torchrun(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "plan.json", "--nproc", "2", "--bogus"])
    assert exit_info.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # plan does not launch anything
        main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "--nnodes", "2"])


def test_run_refuses_a_plan_for_another_model_before_launching(tmp_path, capsys, monkeypatch):
    import autoplan.runtime.launch

    def no_launch(*args, **kwargs):
        raise AssertionError("launched a plan that does not match its model")

    monkeypatch.setattr(autoplan.runtime.launch, "launch", no_launch)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--model", "llama-tiny"]) == 2
    assert "--model llama-tiny but" in capsys.readouterr().err
    stale = tmp_path / "stale.json"
    stale.write_text(out.read_text().replace('"model_fingerprint": "', '"model_fingerprint": "0'))
    assert main(["run", str(stale)]) == 2
    error = capsys.readouterr().err
    assert "plan was made for model 'gpt-tiny'" in error and len(error.strip().splitlines()) == 1


def test_version_defaults_and_file_mode(tmp_path, capsys):
    import os
    import stat

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("autoplan 0.")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "global batch 8 sequences (default max(8, world size 2))" in " ".join(summary.split())
    plan = json.loads(out.read_text())
    assert plan["seq_len"] == 32 and plan["input_sources"]["global_batch_size"].startswith("default")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(SystemExit):
        main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "--global-batch-size", "0"])
    assert "--global-batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_a_cuda_plan_on_a_machine_without_enough_gpus_is_refused_before_launching(tmp_path, capsys, monkeypatch):
    import torch

    import autoplan.runtime.launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(autoplan.runtime.launch, "launch", lambda *a, **k: pytest.fail("launched"))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "dgx-h100:1", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out)]) == 2
    assert "runs 8 CUDA device(s) per node but this machine has 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, argv, words",
    [
        (None, ["plan", "--model", "gpt-tiny", "--cluster", "dgx-h100:0"], "num_nodes: num_nodes must be >= 1, got 0"),
        (
            None,
            ["plan", "--model", "gpt-tiny", "--cluster", "local:2", "--fix", "tp=0"],
            "tp: Input should be greater than or equal to 1 (got 0)",
        ),
        ("folder", ["show", "{tmp}"], "is a folder"),
        ("bad.toml:[x", ["plan", "--model", "gpt-tiny", "--cluster", "{tmp}/bad.toml"], "bad.toml' is not valid toml"),
        (
            'c.toml:preset = "dgx-h100"\nbogus = 3\n',
            ["plan", "--model", "gpt-tiny", "--cluster", "{tmp}/c.toml"],
            "c.toml': unknown override 'bogus'",
        ),
        (
            "user.py:def boom():\n    raise RuntimeError('weights file missing')\n",
            ["plan", "--model", "{tmp}/user.py:boom", "--cluster", "local:2"],
            "user.py:boom: RuntimeError: weights file missing (at ",
        ),
    ],
)
def test_user_errors_are_one_line_naming_file_and_field(tmp_path, capsys, make, argv, words):
    if make and ":" in make:
        name, _, text = make.partition(":")
        (tmp_path / name).write_text(text)
    status = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    error = capsys.readouterr().err.strip()
    assert status == 2 and words in error and len(error.splitlines()) == 1, error


def test_debug_adds_the_traceback(capsys):
    assert main(["--debug", "plan", "--model", "gpt-tiny", "--cluster", "dgx-h100:0"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_bench_plot_without_matplotlib_fails_before_benchmarking(capsys, monkeypatch):
    import importlib.util

    import autoplan.bench.compare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(autoplan.bench.compare, "run_bench", lambda *a, **k: pytest.fail("benchmarked"))
    assert main(["bench", "--model", "gpt-tiny", "--cluster", "local:2", "--plot", "b.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
