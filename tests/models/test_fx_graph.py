"""The trace is a torch.fx graph over the model, each node mapped to the module that ran it."""

from __future__ import annotations

import pytest
import torch

from autoplan.analysis.trace import trace_model
from autoplan.zoo import build
from tests.models.catalog import ALL_MODELS, short_name

pytest.importorskip("transformers")


@pytest.mark.parametrize("model", ALL_MODELS, ids=short_name)
def test_trace_is_an_fx_graph_with_owning_modules(model):
    job = build(model, batch_size=2, device="meta")
    traced = trace_model(job.module, job.example_inputs)
    graph = traced.fx_graph()
    graph.lint()  # call_module targets and get_attr names resolve in the model
    modules = dict(job.module.named_modules())
    nodes = [node for node in graph.nodes if node.op != "output"]
    assert all(node.meta["module"] in modules for node in nodes)
    assert not [node.name for node in nodes if node.name.startswith("external")], "a tensor of unknown origin"
    assert {node.meta["layer"] for node in nodes} - {None} == set(traced.layers)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    assert len(placeholders) == len([x for x in job.example_inputs if isinstance(x, torch.Tensor)])
    output_values = [arg.meta["val"] for arg in graph.output_node().all_input_nodes]
    assert any(
        value.shape == leaf.shape
        for value in output_values
        for leaf in torch.utils._pytree.tree_leaves(traced.output)
        if isinstance(leaf, torch.Tensor)
    )
