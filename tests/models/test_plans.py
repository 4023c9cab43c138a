"""Every foreign model plans on a GPU preset and on local CPU ranks, and what the planner
returns is something the backend can run: sequence parallelism only where the trace found
a region for it, tensor parallelism only where something is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import autoplan
from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES
from autoplan.zoo import build
from tests.models.catalog import ALL_MODELS, short_name

pytest.importorskip("transformers")


@pytest.mark.parametrize("model", ALL_MODELS, ids=short_name)
def test_every_model_plans_and_offers_only_what_runs(model):
    job = build(model, batch_size=16, device="meta")
    for cluster in (autoplan.ClusterSpec.preset("dgx-a100-80gb", num_nodes=2), autoplan.ClusterSpec.local(4)):
        plan = autoplan.plan(job.module, cluster, job.example_inputs, loss_fn=job.loss_fn, model_name=model)
        assert plan.world_size == cluster.world_size
        entry = [path for path, site in plan.tp_styles.items() if site.style == "sequence_parallel_entry"]
        assert plan.sequence_parallel == bool(entry), "SP chosen without a region to run it (or the reverse)"
        if not plan.sequence_parallel:
            assert not any(site.style in SEQUENCE_PARALLEL_STYLES for site in plan.tp_styles.values())
        for candidate in plan.runners_up:
            assert not candidate.sequence_parallel or plan.tp_styles or candidate.mesh["tp"] > 1


def test_sequence_parallel_pinned_where_it_cannot_run_names_the_reason():
    job = build("tests/models/foreign.py:transformer_seq2seq", device="meta")
    with pytest.raises(ValueError, match="sequence_parallel=True cannot run on .*sequence-split"):
        autoplan.plan(
            job.module,
            autoplan.ClusterSpec.local(4),
            job.example_inputs,
            constraints=autoplan.Constraints(tp=2, sequence_parallel=True),
        )


def test_tensor_parallel_pinned_on_a_cnn_says_there_is_nothing_to_split():
    job = build("tests/models/foreign.py:resnet", device="meta")
    with pytest.raises(ValueError, match="nothing to split"):
        autoplan.plan(
            job.module, autoplan.ClusterSpec.local(4), job.example_inputs, constraints=autoplan.Constraints(tp=2)
        )


def test_a_decoder_as_users_build_it_plans_with_its_cache_left_on():
    """`LlamaForCausalLM(config)` keeps `use_cache=True` and may be fed sequences shorter than
    its positions: tracing runs it without the key/value cache (else a layer profiled after
    the trace attends over the cached keys too) and leaves the config as it was."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(Path(__file__).parent / "configs" / "llama.json")  # 32 positions
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plan = autoplan.plan(
        model, autoplan.ClusterSpec.local(2), (torch.randint(0, 128, (4, 16)),), constraints=autoplan.Constraints(tp=2)
    )
    assert plan.mesh["tp"] == 2 and model.config.use_cache


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def forward(self, x):
        return self.body(x) if self.gate(x).sum() > 0 else x


def test_an_untraceable_model_names_the_module_the_op_and_the_fix():
    with pytest.raises(autoplan.TraceError) as error:
        autoplan.plan(_DataDependent(), autoplan.ClusterSpec.local(2), (torch.randn(4, 8),))
    message = str(error.value)
    assert "cannot trace _DataDependent: module '<root>'" in message and "'__bool__'" in message
    assert "torch.export" in message and len(message.splitlines()) == 1
