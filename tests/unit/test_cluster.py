import json

import pytest
import torch

from autoplan import ClusterSpec, Constraints
from autoplan.zoo import build


def test_preset_world_size_and_overrides():
    cluster = ClusterSpec.preset("dgx-h100", num_nodes=4, inter_node_gbps_per_device=25.0)
    assert cluster.world_size == 32
    assert cluster.inter_node.bandwidth_gbps == 25.0
    assert cluster.intra_node.bandwidth_gbps == 450.0


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_file_round_trip(tmp_path, suffix):
    cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=2, intra_node_gbps_per_device=200.0)
    path = tmp_path / f"cluster{suffix}"
    cluster.to_file(path)
    assert ClusterSpec.from_file(path) == cluster


def test_short_file_is_a_preset_with_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "dgx-a100-40gb", "num_nodes": 3, "inter_node_gbps_per_device": 12.5}))
    cluster = ClusterSpec.from_file(path)
    assert cluster.world_size == 24 and cluster.inter_node.bandwidth_gbps == 12.5


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(num_nodes=0), "num_nodes"),
        (dict(memory_bytes=-1), "memory_bytes"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_cluster_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ClusterSpec.preset("dgx-a100-80gb", **bad)


def test_unknown_device_preset():
    with pytest.raises(ValueError, match="unknown cluster preset 'tpu-v9'"):
        ClusterSpec.parse("tpu-v9:4")


def test_constraints_dtypes_and_fix():
    assert Constraints(param_dtype=torch.bfloat16).param_dtype == "bfloat16"
    fixed = Constraints.parse_fix("dp=8,tp=4,pp=2,schedule=1f1b,sequence_parallel=true")
    assert (fixed.dp, fixed.tp, fixed.pp, fixed.schedule, fixed.sequence_parallel) == (8, 4, 2, "1f1b", True)
    with pytest.raises(ValueError, match="zero_stage"):
        Constraints(zero_stage=4)
    with pytest.raises(ValueError, match="nonsense"):
        Constraints.parse_fix("nonsense=3")


@pytest.mark.parametrize(
    "name, published",
    [
        ("gpt3-175b", 174.6e9),
        ("megatron-1t", 1008.0e9),
        ("megatron-1.7b", 1.7e9),
        ("llama2-7b", 6.74e9),
        ("llama3-70b", 70.55e9),
        ("llama3-405b", 405.9e9),
    ],
)
def test_zoo_parameter_counts_match_published(name, published):
    module = build(name, batch_size=1).module
    count = sum(p.numel() for p in module.parameters())
    assert abs(count - published) / published < 0.03
