"""A Plan is checked where it is made and read (`Plan.from_json`, so `show` and `run`, and
`parallelize`): random mutations of a valid plan are either still valid or refused with one
line naming the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoplan
from autoplan.cli import main
from autoplan.schema.plan import Plan
from autoplan.zoo import build

FIELDS = [
    "global_batch_size",
    "micro_batch_size",
    "num_micro_batches",
    "virtual_stages",
    "zero_stage",
    "seq_len",
    "mesh.dp",
    "mesh.pp",
    "mesh.tp",
    "version",
    "stages.0.index",
    "stages.0.pp_rank",
    "layers.0.stage",
]


@pytest.fixture(scope="module")
def valid() -> dict:
    job = build("gpt-tiny", batch_size=8, device="meta")
    plan = autoplan.plan(
        job.module,
        autoplan.ClusterSpec.local(4),
        job.example_inputs,
        constraints=autoplan.Constraints(dp=1, pp=2, tp=2),
        model_name="gpt-tiny",
    )
    return json.loads(plan.model_dump_json())


def _set(data: dict, path: str, value: int) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    data[int(last) if isinstance(data, list) else last] = value


# 250 examples x 2-3 mutations each: at least 500 mutations per CI run (issue 11)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), st.integers(-3, 2048)), min_size=2, max_size=3))
def test_a_mutated_plan_is_valid_or_refused_in_one_line_naming_the_field(valid, mutations):
    data = json.loads(json.dumps(valid))
    for path, value in mutations:
        _set(data, path, value)
    try:
        plan = Plan.model_validate(data)
    except ValueError as error:
        message = str(error).splitlines()
        reason = message[1].strip() if len(message) > 1 else message[0]  # pydantic: "1 validation error ..."
        assert any(
            word in reason
            for word in (
                "mesh",
                "batch",
                "stage",
                "layers",
                "version",
                "seq_len",
                "tp(",
                "zero_stage",
                "virtual_stages",
                "greater",
                "less",
            )
        ), reason
        return
    assert plan.micro_batch_size * plan.num_micro_batches * plan.mesh["dp"] == plan.global_batch_size
    assert plan.world_size == plan.cluster.world_size
    assert len(plan.stages) == plan.mesh["pp"] * plan.virtual_stages


@pytest.mark.parametrize(
    "path, value, words",
    [
        ("mesh.dp", 2, "mesh dp(2) * pp(2) * tp(2) = 8 != cluster world_size 4"),
        ("micro_batch_size", -1, "micro_batch_size must be >= 1, got -1"),
        ("mesh.tp", -2, "must give dp, pp and tp, each >= 1"),
        ("global_batch_size", 12, "global_batch_size 12 != micro_batch_size"),
        ("version", 7, "version 7"),
    ],
)
def test_show_and_run_refuse_an_inconsistent_plan_file_in_one_line(valid, tmp_path, capsys, path, value, words):
    data = json.loads(json.dumps(valid))
    _set(data, path, value)
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(data))
    for command in (["show", str(bad)], ["run", str(bad)]):
        assert main(command) == 2
        error = capsys.readouterr().err.strip()
        assert words in error and len(error.splitlines()) == 1, error


def test_no_plan_that_fits_is_an_infeasible_error_and_bad_pins_are_not():
    job = build("gpt2-xl", batch_size=8, device="meta")
    cluster = autoplan.ClusterSpec.preset("dgx-a100-40gb", num_nodes=1).model_copy(update={"devices_per_node": 1})
    with pytest.raises(autoplan.InfeasibleError, match="no plan fits in memory"):
        autoplan.plan(
            job.module, cluster, job.example_inputs, constraints=autoplan.Constraints(max_memory_fraction=0.01)
        )
    with pytest.raises(autoplan.AutoplanError) as error:
        autoplan.plan(
            job.module, autoplan.ClusterSpec.local(2), job.example_inputs, constraints=autoplan.Constraints(tp=3)
        )
    assert not isinstance(error.value, autoplan.InfeasibleError)


def test_zero_with_one_data_parallel_rank_is_refused_not_renamed():
    job = build("gpt-tiny", batch_size=8, device="meta")
    with pytest.raises(autoplan.AutoplanError, match="zero_stage=1 shards model states over dp, but dp=1"):
        autoplan.plan(
            job.module,
            autoplan.ClusterSpec.local(2),
            job.example_inputs,
            constraints=autoplan.Constraints(dp=1, pp=2, zero_stage=1),
        )
    plan = autoplan.plan(
        job.module, autoplan.ClusterSpec.local(4), job.example_inputs, constraints=autoplan.Constraints(zero_stage=3)
    )
    assert plan.mesh["dp"] > 1


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"activation_dtype": "int8"}, "activation_dtype 'int8' is not one of"),
        (
            {"activation_dtype": "float8_e4m3fn", "recompute": "full"},
            "narrower storage runs only with recompute 'none'",
        ),
        ({"matmul_dtype": "float16"}, "matmul_dtype 'float16': matmuls run in param_dtype or float8_e4m3fn"),
    ],
)
def test_a_layer_dtype_no_backend_runs_is_refused(valid, changes, words):
    data = json.loads(json.dumps(valid))
    data["layers"][4].update(changes)
    with pytest.raises(ValueError, match=words):
        Plan.model_validate(data)
