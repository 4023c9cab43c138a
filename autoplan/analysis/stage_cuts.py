"""Where a pipeline stage may begin: the layer graph of what each layer reads.

    >>> from autoplan import zoo
    >>> from autoplan.analysis.trace import trace_model
    >>> job = zoo.build("gpt-tiny", batch_size=1, device="meta")
    >>> traced = trace_model(job.module, job.example_inputs)
    >>> sorted(layer_graph(traced).predecessors("blocks.0"))
    ['drop']
    >>> stage_start_blockers(traced)["blocks.0"]
    "a stage starting at 'blocks.0' must also receive the output of 'tok_emb', which 'blocks.0' reads"

The layer graph (a networkx DiGraph) has an edge A -> B when the values B is called with
depend on A's output through the code between layers (not through other layers), and
A -> OUTPUT when the model's output does; into a parameter-free layer, when its output
depends on A's (rotary embeddings read the hidden states only for their dtype). A pipeline
stage hands the next one a single activation, so a stage may begin at layer i only when every layer from i on that has
parameters, and the model's output, read nothing from before i but

* the activation sent: the output of the last layer with parameters before i (called
  once), after which only parameter-free layers may follow in its stage;
* outputs of parameter-free layers (rotary tables, dropout), which run again in every
  stage, provided what they read passes the same test;
* the model's inputs, which travel beside the activation.

This is the rule `backends.pipeline_split` enforces when it splits a model by module
(Hugging Face models); its split by torch.fx graph can pass more, so every cut allowed
here runs. An encoder-decoder model cannot be cut inside its decoder (every decoder
layer reads the encoder's output), nor `torch.nn.Transformer` anywhere (the decoder reads
the target embedding computed before the encoder).
"""

from __future__ import annotations

import networkx as nx

from autoplan.analysis.graph import TracedModel

OUTPUT = "<output>"
"""The layer graph's node for the model's output."""


def layer_graph(traced: TracedModel) -> nx.DiGraph:
    """Layers (in execution order, attribute `index`; `has_parameters`) and OUTPUT, with an
    edge A -> B when B reads A's output."""
    graph = nx.DiGraph()
    for index, layer in enumerate(traced.layers):
        module = traced.module.get_submodule(layer)
        graph.add_node(
            layer,
            index=index,
            has_parameters=next(module.parameters(), None) is not None,
            num_calls=traced.num_calls.get(layer, 1),
        )
    graph.add_node(OUTPUT, index=len(traced.layers), has_parameters=True, num_calls=1)
    for layer in traced.layers:  # a parameter-free layer runs again where needed: what it passes on counts
        reads = (
            traced.layer_reads.get(layer, set())
            if graph.nodes[layer]["has_parameters"]
            else traced.layer_derives.get(layer, set())
        )
        graph.add_edges_from((source, layer) for source in reads if source != layer)
    graph.add_edges_from((source, OUTPUT) for source in traced.output_reads)
    return graph


def stage_start_blockers(traced: TracedModel) -> dict[str, str]:
    """Layer -> why a pipeline stage cannot begin there (layers that may begin a stage, and
    the first layer, are not in it)."""
    graph = layer_graph(traced)
    blockers = {}
    for index, layer in enumerate(traced.layers[1:], start=1):
        reason = _blocker(graph, traced.layers, index)
        if reason:
            blockers[layer] = reason
    return blockers


def _blocker(graph: nx.DiGraph, layers: list[str], start: int) -> str | None:
    before = layers[:start]
    sent = next((name for name in reversed(before) if graph.nodes[name]["has_parameters"]), before[-1])
    if graph.nodes[sent]["num_calls"] > 1:
        return (
            f"a stage starting at {layers[start]!r} would receive the output of {sent!r}, which forward "
            f"calls {graph.nodes[sent]['num_calls']} times"
        )

    def unmet(source: str, seen: set[str]) -> str | None:
        """The earlier layer with parameters that reading `source` needs, if any."""
        if source == sent or source in seen:
            return None
        seen.add(source)
        node = graph.nodes[source]
        if node["has_parameters"]:
            return source if node["index"] < start else None
        return next((found for pred in graph.predecessors(source) if (found := unmet(pred, seen))), None)

    readers = [name for name in layers[start:] if graph.nodes[name]["has_parameters"]] + [OUTPUT]
    for reader in readers:
        for source in graph.predecessors(reader):
            found = unmet(source, set())
            if found:
                who = "the model's output" if reader == OUTPUT else repr(reader)
                return (
                    f"a stage starting at {layers[start]!r} must also receive the output of {found!r}, "
                    f"which {who} reads"
                )
    return None
