"""benchmarks/torchtitan_h100.py: which reference rows it can express, how it pins them, and that
every expressible row evaluates to a plan on the published mesh (hermetic: the vendored
tests/data/torchtitan_h100.json, models on meta). The MAE is the benchmark's number, not a test's."""

from __future__ import annotations

import doctest
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "torchtitan_h100.py"
EAGER = {"h100_2412_T1_8b_8gpu_fsdp", "h100_2412_T3_8b_128gpu_fsdp"}
COMPILED = {
    "h100_2412_T1_8b_8gpu_fsdp_compile",
    "h100_2412_T3_8b_128gpu_fsdp_compile",
    "h100_2506_asynctp_70b_256gpu_bf16_vanillatp",
    "h100_2506_asynctp_8b_64gpu_bf16_vanillatp",
    "h100_2408_405b_128gpu_none",
}


@pytest.fixture(scope="module")
def titan():
    """The script as a module (once per test module: its profiles are cached on it)."""
    spec = importlib.util.spec_from_file_location("torchtitan_h100", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(titan) -> dict[str, dict]:
    return {row["id"]: row for row in titan.load_runs()}


def test_reads_the_vendored_copy_inside_the_repository(titan):
    assert titan.REFERENCE == ROOT / "tests" / "data" / "torchtitan_h100.json"
    assert titan.REFERENCE.is_file()


def test_row_classes_eager_compiled_and_skipped(titan, runs):
    classes = {row_id: titan.row_class(row) for row_id, row in runs.items()}
    assert {i for i, c in classes.items() if c == "eager"} == EAGER
    assert {i for i, c in classes.items() if c == "compile"} == COMPILED
    assert sum(c == "skipped" for c in classes.values()) == len(runs) - len(EAGER) - len(COMPILED)


@pytest.mark.parametrize(
    ("row_id", "reason"),
    [
        ("h100_2412_T2_8b_8gpu_fsdp4_cp2", "context parallel (cp=2)"),
        ("h100_2412_T1_8b_8gpu_fsdp_compile_fp8", "float8 training: this set pins bf16"),
        ("h100_2506_asynctp_8b_64gpu_bf16_asynctp", "async TP"),
        ("b200_mxfp8doc_8b_8gpu_bf16", "B200"),
        ("gb200_mxfp8doc_llama4scout_bf16", "model not in the zoo"),
        ("paper_2410.06511_8b_8gpu_fsdp", "local batch size not published"),
        ("h100_example_log_graph_trainer_llama3_8b_8gpu", "precision not published"),
    ],
)
def test_skipped_rows_say_why(titan, runs, row_id, reason):
    assert any(reason in text for text in titan.skip_reasons(runs[row_id]))


def test_zoo_models_are_the_reference_model_args(titan, runs):
    assert titan.zoo_name(runs["h100_2506_asynctp_70b_256gpu_bf16_vanillatp"]["model"]) == "llama3-70b"
    assert titan.zoo_name(runs["h100_2408_405b_128gpu_none"]["model"]) == "llama3-405b"
    assert titan.zoo_name(runs["blackwell_nvfp4doc_qwen3_8b_4gpu_bf16"]["model"]) is None


def test_constraints_pin_the_published_configuration(titan, runs):
    fsdp = titan.row_constraints(runs["h100_2412_T1_8b_8gpu_fsdp"])
    assert fsdp.pinned() == {
        "dp": 8,
        "tp": 1,
        "pp": 1,
        "micro_batch_size": 2,
        "schedule": "1f1b",
        "zero_stage": 3,
        "recompute": "selective",
        "sequence_parallel": False,
        "param_dtype": "bfloat16",
        "grad_reduce_dtype": "float32",
    }
    two_d = titan.row_constraints(runs["h100_2506_asynctp_70b_256gpu_bf16_vanillatp"])
    assert (two_d.dp, two_d.tp, two_d.recompute, two_d.sequence_parallel) == (32, 8, "full", True)


def test_cluster_is_the_96gb_500w_h100(titan):
    cluster = titan.h100_cluster(128)
    assert (cluster.num_nodes, cluster.devices_per_node, cluster.world_size) == (16, 8, 128)
    assert cluster.device.memory_bytes == 96 * 10**9
    assert cluster.device.memory_bandwidth_gbps == 2400.0
    assert cluster.device.peak_flops["bfloat16"] == pytest.approx((989.5e12 + 835e12) / 2)
    assert cluster.device.name == titan.DEVICE_NAME


def test_every_expressible_row_plans_on_its_pinned_mesh(titan, runs, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert titan.main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eager rows (headline): throughput MAE" in printed and "Skipped: 45 rows" in printed
    written = json.loads(out.read_text())
    assert {r["id"] for r in written["rows"]} == EAGER | COMPILED
    for result in written["rows"]:
        row = runs[result["id"]]
        assert "refused" not in result, result
        assert result["mesh"] == {"dp": row["dp"], "tp": row["tp"], "pp": row["pp"]}
        assert result["micro_batch_size"] == row["local_batch_size"]
        assert result["tps_error"] == pytest.approx(result["predicted_tps"] / row["tokens_per_s_per_gpu"] - 1)
        step_s = sum(result["time_terms_s"].values())
        assert step_s == pytest.approx(result["predicted_step_s"], rel=1e-6)  # the terms add up to the step
    assert written["summary"]["eager"]["tps_rows"] == len(EAGER)
    assert written["summary"]["all"]["memory_rows"] == 4  # peak memory is published for the four 8B FSDP rows


def test_docstring_examples(titan):
    results = doctest.testmod(titan, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.failed == 0 and results.attempted >= 4
