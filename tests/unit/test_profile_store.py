"""Profile files: measured on this CPU, written, read back, applied by signature and device kind.

Expected times are read from the written JSON itself (plain dicts), never recomputed
through the code under test. gpt-tiny has 9 layers: tok_emb, pos_emb, drop, blocks.0-3,
ln_f, lm_head (the loss rides on lm_head).
"""

import json

import pytest

from autoplan import zoo
from autoplan.analysis.profile import profile_model
from autoplan.cli import main
from autoplan.costmodels.compute import estimate_layer_time
from autoplan.measure.profile_store import default_micro_batch_sizes, measure_profile, measure_zoo_profile
from autoplan.planner.measured import apply_profile
from autoplan.planner.planning import explain, plan, planning_with_profile
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.plan import Plan
from autoplan.schema.profile import LayerProfile
from autoplan.schema.profile_file import LOSS_SUFFIX, ProfileFile

LOCAL = ClusterSpec.local(2)
H100 = ClusterSpec.preset("dgx-h100")
TIME_KWARGS = dict(tp=1, sequence_parallel=False, recompute="none", compute_dtype="float32")


@pytest.fixture(scope="module")
def job():
    return zoo.build("gpt-tiny", batch_size=2, device="meta")


@pytest.fixture(scope="module")
def written(job, tmp_path_factory):
    """(path, the file's JSON as plain dicts) of a profile measured for micro-batches 1 and 2."""
    path = tmp_path_factory.mktemp("profile") / "gpt-tiny.cpu.json"
    measure_zoo_profile("gpt-tiny", [1, 2], progress=False).to_json(path)
    return path, json.loads(path.read_text())


@pytest.fixture(scope="module")
def estimated(job):
    return profile_model(
        job.module, job.example_inputs, model_name="gpt-tiny", loss_fn=job.loss_fn, targets=job.targets
    )


def block_entry(raw: dict, estimated) -> dict:
    block = next(layer for layer in estimated.layers if layer.name == "blocks.0")
    return raw["entries"][block.signature]


def test_file_round_trips_and_keys_distinct_layers(written):
    path, raw = written
    loaded = ProfileFile.from_json(path)
    assert loaded.model_dump(mode="json") == raw
    assert raw["device_kind"] == "cpu" and raw["device_name"] == "cpu" and raw["compute_dtype"] == "float32"
    assert raw["num_threads"] == 1  # one thread, as each local rank runs
    # 9 layers, the 4 blocks share one signature: 6 entries, the last one with the loss
    assert len(raw["entries"]) == 6
    examples = {entry["example_layer"]: (key, entry["num_layers"]) for key, entry in raw["entries"].items()}
    assert examples["blocks.0"][1] == 4 and examples["lm_head"][0].endswith(LOSS_SUFFIX)
    for entry in raw["entries"].values():
        assert set(entry["micro_batches"]) == {"1", "2"}
        assert all(m["fwd_s"] > 0 and m["bwd_s"] > 0 for m in entry["micro_batches"].values())


def test_applied_profile_gives_the_measured_times(written, estimated):
    path, raw = written
    applied, summary = apply_profile(estimated, ProfileFile.from_json(path), LOCAL.device, source=path.name)
    assert summary == f"{path.name}: measured on cpu for 9/9 layers"
    block = next(layer for layer in applied.layers if layer.name == "blocks.2")
    stored = block_entry(raw, estimated)["micro_batches"]
    for b in (1, 2):
        time = estimate_layer_time(block, LOCAL.device, micro_batch_size=b, **TIME_KWARGS)
        assert (time.forward_s, time.backward_s) == pytest.approx((stored[str(b)]["fwd_s"], stored[str(b)]["bwd_s"]))
    # beyond the measured sizes: the per-sequence time of the nearest one (2), times 3
    time = estimate_layer_time(block, LOCAL.device, micro_batch_size=3, **TIME_KWARGS)
    assert time.forward_s == pytest.approx(stored["2"]["fwd_s"] / 2 * 3)
    # two ranks sharing each core take twice as long as the one thread that was measured
    shared, summary = apply_profile(estimated, ProfileFile.from_json(path), LOCAL.device, stretch=2.0)
    block = next(layer for layer in shared.layers if layer.name == "blocks.2")
    time = estimate_layer_time(block, LOCAL.device, micro_batch_size=1, **TIME_KWARGS)
    assert time.forward_s == pytest.approx(2 * stored["1"]["fwd_s"]) and "x2" in summary


def test_between_measured_sizes_the_per_sequence_time_is_interpolated():
    shape = dict(name="l", signature="s", param_count=0, fwd_flops=1e9, bwd_flops=2e9, saved_bytes={}, output_bytes=0)
    layer = LayerProfile(
        **shape,
        measured_fwd_s=0.010,
        measured_device="cpu",
        measured_by_mbs={2: (0.020, 0.040), 6: (0.036, 0.060)},
    )
    # per sequence: forward 10 ms at b=2, 6 ms at b=6 -> 8 ms at b=4; backward 20 -> 10 -> 15 ms
    time = estimate_layer_time(layer, LOCAL.device, micro_batch_size=4, **TIME_KWARGS)
    assert (time.forward_s, time.backward_s) == pytest.approx((4 * 0.008, 4 * 0.015))


def test_a_cuda_profile_applies_to_cuda_presets_only(written, estimated):
    path, _ = written
    on_gpu = ProfileFile.from_json(path).model_copy(
        update=dict(device_kind="cuda", device_name="NVIDIA H100 80GB HBM3", compute_dtype="bfloat16")
    )
    unchanged, summary = apply_profile(estimated, on_gpu, LOCAL.device, compute_dtype="float32", source="h100.json")
    assert unchanged is estimated and "not used" in summary and "cuda" in summary
    applied, summary = apply_profile(estimated, on_gpu, H100.device, compute_dtype="bfloat16", source="h100.json")
    assert summary == "h100.json: measured on NVIDIA H100 80GB HBM3 for 9/9 layers"
    block = next(layer for layer in applied.layers if layer.name == "blocks.0")
    assert block.measured_source == "NVIDIA H100 80GB HBM3 (h100.json)"
    expected = on_gpu.entries[block.signature].micro_batches[1]
    time = estimate_layer_time(block, H100.device, micro_batch_size=1, **{**TIME_KWARGS, "compute_dtype": "bfloat16"})
    assert (time.forward_s, time.backward_s) == pytest.approx((expected.fwd_s, expected.bwd_s))
    # measured in bfloat16, planned in float32: not used, and the summary says how to fix it
    _, summary = apply_profile(estimated, on_gpu, H100.device, compute_dtype="float32", source="h100.json")
    assert "not used" in summary and "--dtype float32" in summary


def test_plan_names_measured_and_estimated_layers(written, job, tmp_path):
    path, raw = written
    partial = dict(
        raw, entries={key: entry for key, entry in raw["entries"].items() if entry["example_layer"] != "tok_emb"}
    )
    partial_path = tmp_path / "partial.json"
    partial_path.write_text(json.dumps(partial))
    result = plan(
        job.module, LOCAL, job.example_inputs, loss_fn=job.loss_fn, model_name="gpt-tiny", profile_file=partial_path
    )
    assert result.measured_sources["layer_time"] == (
        "estimated (roofline) for 1/9 layers (tok_emb); "
        "measured on cpu (partial.json) for 8/9 layers (pos_emb .. lm_head)"
    )
    assert result.measured_sources["profile_file"].startswith("partial.json: measured on cpu for 8/9 layers")
    assert [layer.time_source for layer in result.layers[:2]] == [
        "estimated (roofline)",
        "measured on cpu (partial.json)",
    ]
    report = " ".join(explain(result).split())  # the report wraps at 100 columns
    assert "cost sources" in report and "measured on cpu (partial.json) for 8/9 layers" in report
    # `autoplan bench` reaches its plans through the context, and without a file nothing is measured
    with planning_with_profile(path):
        assert plan(job.module, LOCAL, job.example_inputs).measured_sources["layer_time"].startswith("measured")
    assert plan(job.module, LOCAL, job.example_inputs).measured_sources["layer_time"] == "estimated (roofline)"


def test_plans_written_before_profiles_still_load(written, job, tmp_path):
    data = plan(job.module, LOCAL, job.example_inputs).model_dump(mode="json")
    for layer in data["layers"]:
        del layer["time_source"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert "layer time" in explain(Plan.from_json(old))


def test_measured_saved_bytes_match_the_profilers_count(written, estimated):
    """A block keeps 16 s h + 4 s + a s floats (tests/unit/test_profile.py); the real
    autograd on this CPU keeps about that (its attention kernel may save a little else)."""
    _, raw = written
    block = next(layer for layer in estimated.layers if layer.name == "blocks.0")
    for b, measured in block_entry(raw, estimated)["micro_batches"].items():
        ratio = measured["saved_bytes"] / (block.saved_bytes["none"] * int(b))
        assert 0.8 < ratio < 1.25, f"micro-batch {b}: measured / profiled = {ratio:.2f}"


def test_default_micro_batch_sizes():
    assert default_micro_batch_sizes(8) == [1, 2, 4, 8]
    assert default_micro_batch_sizes(1536) == [1, 2, 4, 8]
    assert default_micro_batch_sizes(6) == [1, 2]


def test_measuring_needs_enough_sequences(job):
    with pytest.raises(ValueError, match="micro-batch size 4 > the 2 sequences"):
        measure_profile(job.module, job.example_inputs, device="cpu", micro_batch_sizes=[1, 4], progress=False)


def test_cli_profile_plan_show(tmp_path, capsys):
    profile, out = tmp_path / "tiny.json", tmp_path / "plan.json"
    assert (
        main(["profile", "--model", "gpt-tiny", "--device", "cpu", "--micro-batch-sizes", "1", "-o", str(profile)]) == 0
    )
    assert "blocks.0 (x4)" in capsys.readouterr().out
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "--profile", str(profile), "-o", str(out)]) == 0
    assert main(["show", str(out)]) == 0
    assert "measured on cpu (tiny.json)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"version": 1, "entries": {}}), "is not a valid profile"),
        (json.dumps({"version": 7}), "has version 7"),
    ],
)
def test_a_bad_profile_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local:2", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoplan: error: profile file") and str(bad) in err and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["run", str(tmp_path / "plan.json"), "--profile", "p.json"]) == 2
    assert main(["profile", "--model", "gpt-tiny", "--micro-batch-sizes", "1,x"]) == 2
    err = capsys.readouterr().err
    assert "--profile applies when planning" in err and "--micro-batch-sizes '1,x'" in err
