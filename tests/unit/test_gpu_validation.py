"""benchmarks/gpu_validation.py: its CPU smoke run end to end, and its answer on a machine without CUDA."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_validation.py"


def _load_script():
    """The script as a module (registered first: its dataclass looks its module up)."""
    if "gpu_validation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_validation", SCRIPT)
        sys.modules["gpu_validation"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_validation"])
    return sys.modules["gpu_validation"]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.distributed  # runs the script in a fresh interpreter
def test_cpu_smoke_run_prints_both_parts_and_writes_markdown(tmp_path):
    out = tmp_path / "validation.md"
    result = _run("--device", "cpu", "--quick", "--markdown", str(out))
    assert result.returncode == 0, result.stderr
    for text in (
        "Part 1: per-layer time",
        "Part 2: single device end to end",
        "gpt",
        "llama",
        "6/6 plans ran",
    ):  # 2 models x 3 recompute options, each planned, run and measured
        assert text in result.stdout
    document = out.read_text()
    assert document.startswith("### CPU") and "| model | hidden | seq |" in document
    for recompute in ("none", "selective", "full"):
        assert f"| {recompute} |" in document


@pytest.mark.distributed  # runs the script in a fresh interpreter
def test_without_cuda_it_says_so_and_exits_0():
    # hide any GPU, so the answer of a machine without one is checked on every machine
    result = _run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no CUDA device: nothing to validate (run with --device cpu for a smoke run)"


@pytest.mark.parametrize(
    "name, preset",
    [
        ("NVIDIA A100-SXM4-80GB", "dgx-a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "dgx-a100-40gb"),
        ("NVIDIA H100 80GB HBM3", "dgx-h100"),
        ("NVIDIA H200", "dgx-h200"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_name_to_preset(name, preset):
    assert _load_script().preset_for(name) == preset
