"""Stage cuts come from the layer graph (networkx): a pipeline stage begins only where one
activation crosses, so the planner never offers a cut the backend cannot make."""

from __future__ import annotations

import networkx as nx
import pytest

import autoplan
from autoplan.analysis.stage_cuts import OUTPUT, layer_graph, stage_start_blockers
from autoplan.analysis.trace import trace_model
from autoplan.planner.planning import plan_from_profile
from autoplan.planner.search_space import split_layers
from autoplan.zoo import build
from tests.models.catalog import CONFIGS
from tests.planner.test_solver import tiny_profile

pytest.importorskip("transformers")

SEQ2SEQ = "tests/models/foreign.py:transformer_seq2seq"


def _traced(model: str):
    job = build(model, batch_size=2, device="meta")
    return trace_model(job.module, job.example_inputs)


def test_a_decoder_may_begin_a_stage_between_any_two_blocks():
    traced = _traced(f"hf:{CONFIGS / 'llama.json'}")
    graph = layer_graph(traced)
    assert isinstance(graph, nx.DiGraph) and nx.is_directed_acyclic_graph(graph)
    assert set(graph.predecessors("model.layers.2")) == {"model.layers.1", "model.rotary_emb"}
    assert set(graph.predecessors(OUTPUT)) == {"lm_head"}
    blockers = stage_start_blockers(traced)
    assert not any(layer.startswith("model.layers.") for layer in blockers)


def test_an_encoder_decoder_cannot_be_cut_where_the_decoder_reads_the_encoder():
    blockers = stage_start_blockers(_traced(f"hf:{CONFIGS / 't5.json'}"))
    assert all("output of 'encoder." in blockers[f"decoder.block.{i}"] for i in (0, 1))
    blockers = stage_start_blockers(_traced(SEQ2SEQ))
    assert blockers["transformer.decoder.layers.1"] == (
        "a stage starting at 'transformer.decoder.layers.1' must also receive the output of "
        "'transformer.encoder.norm', which 'transformer.decoder.layers.1' reads"
    )
    assert "'tgt_emb'" in blockers["transformer.encoder.layers.1"]  # the decoder reads the target embedding


def test_the_body_is_the_longest_run_a_stage_may_be_cut_inside():
    profile = tiny_profile()
    profile.stage_start_blockers = {"blocks.2": "a stage starting at 'blocks.2' must also receive ..."}
    split = split_layers(profile)
    assert (split.blocks, split.cut_blocker) == ((1, 2), None)  # blocks.0-1 | blocks.2-3: the first
    profile.stage_start_blockers = {f"blocks.{i}": f"no cut before blocks.{i}" for i in range(1, 4)}
    split = split_layers(profile)
    assert (split.blocks, split.num_cuttable_blocks, split.cut_blocker) == ((1, 2, 3, 4), 1, "no cut before blocks.1")
    with pytest.raises(ValueError, match="pp=2 exceeds the 1 repeated blocks the model can be cut into: no cut before"):
        plan_from_profile(profile, autoplan.ClusterSpec.local(4), autoplan.Constraints(pp=2))


def test_pinned_pipeline_on_nn_transformer_cuts_where_one_tensor_crosses():
    job = build(SEQ2SEQ, batch_size=8, device="meta")
    plan = autoplan.plan(
        job.module, autoplan.ClusterSpec.local(2), job.example_inputs, constraints=autoplan.Constraints(pp=2)
    )
    blockers = stage_start_blockers(trace_model(job.module, job.example_inputs))
    assert plan.stages[1].layers[0] not in blockers
