"""Split by torch.fx graph: each pipeline stage a GraphModule cut from one trace of the model
(the first way `pipeline_split.split_model` tries).

The model is traced with `torch.fx` keeping every plan layer a leaf `call_module`, so each
stage is a small `GraphModule` whose glue (adds, position ids, ...) is traced and whose
layers are the model's modules. Stage k's graph takes the values live across the cut before
it as positional inputs (stage 0 takes the model's inputs) and returns those live across
the cut after it; a value made in stage i and used in stage j > i + 1 is passed through the
stages in between, since a pipeline stage only receives from its predecessor. Only tensors
travel: attribute reads and shape arithmetic (`T = tokens.shape[1]`) are recomputed in each
stage that needs them, from the tensors it receives. A cut falls right before the first
layer of a stage, as `SplitPoint.BEGINNING` would put it.
"""

from __future__ import annotations

import operator

from torch import fx, nn


class LayerLeafTracer(fx.Tracer):
    """Trace through everything except the plan's layers, which stay `call_module`s."""

    def __init__(self, layer_names: set[str]):
        super().__init__()
        self.layer_names = layer_names

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname in self.layer_names or super().is_leaf_module(module, qualname)


SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "get_device"})
SHAPE_ARITHMETIC = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.neg,
    }
)


def _rematerialized_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes every stage that reads them recomputes instead of receiving: attribute reads
    (`get_attr`) and shape arithmetic (`T = tokens.shape[1]`, `x.size(0) // 2`), whose
    values are not tensors and so cannot travel between pipeline stages."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if (
            node.op == "get_attr"
            or (node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES)
            or (node.op == "call_method" and node.target in SHAPE_METHODS)
            or (
                node.op == "call_function"
                and node.target in SHAPE_ARITHMETIC
                and node.all_input_nodes
                and all(value in found for value in node.all_input_nodes)
            )
        ):
            found.add(node)
    return found


def _assign_stages(graph: fx.Graph, stage_of_layer: dict[str, int], rematerialized: set[fx.Node]) -> dict[fx.Node, int]:
    """Stage of every compute node: a layer's node goes to the layer's stage, glue goes to
    the stage of the latest layer before it. Rematerialized nodes belong to no stage."""
    stage_of: dict[fx.Node, int] = {}
    current, last_layer = 0, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in rematerialized:
            continue
        if node.op == "call_module" and node.target in stage_of_layer:
            stage = stage_of_layer[node.target]
            if stage < current:
                raise ValueError(
                    f"layer {node.target!r} is planned on stage {stage} but runs after layer "
                    f"{last_layer!r} of stage {current}: stages must follow execution order"
                )
            current, last_layer = stage, node.target
        stage_of[node] = current
    called = {node.target for node in stage_of if node.op == "call_module"}
    never_called = sorted(set(stage_of_layer) - called)
    if never_called:
        raise ValueError(f"plan layers {never_called} are never called by forward, so they cannot mark stage cuts")
    return stage_of


def _stage_graph(
    graph: fx.Graph,
    stage_of: dict[fx.Node, int],
    rematerialized: set[fx.Node],
    stage: int,
    num_stages: int,
    live_in: list[fx.Node],
    live_out: list[fx.Node],
) -> fx.Graph:
    """The graph of one stage: inputs `live_in`, its own nodes, outputs `live_out`
    (the model's output on the last stage)."""
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in live_in:
        env[node] = new_graph.placeholder(node.name, type_expr=node.type)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:  # recomputed here from this stage's values
            assert node in rematerialized, f"{node} used before it is defined in stage {stage}"
            env[node] = new_graph.node_copy(node, lookup)
        return env[node]

    for node in graph.nodes:
        if stage_of.get(node) == stage:
            env[node] = new_graph.node_copy(node, lookup)
        elif node.op == "output" and stage == num_stages - 1:
            new_graph.output(fx.map_arg(node.args[0], lookup))
    if stage < num_stages - 1:
        outputs = [lookup(node) for node in live_out]
        new_graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    new_graph.lint()
    return new_graph


def split_graph(model: nn.Module, graph: fx.Graph, stage_layers: list[list[str]]) -> list[fx.GraphModule]:
    """One GraphModule per stage, cut from the fx graph of the whole model."""
    stage_of_layer = {name: index for index, names in enumerate(stage_layers) for name in names}
    rematerialized = _rematerialized_nodes(graph)
    stage_of = _assign_stages(graph, stage_of_layer, rematerialized)
    num_stages = len(stage_layers)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]

    def defined_in(node: fx.Node) -> int:
        return 0 if node.op == "placeholder" else stage_of[node]

    def sources(value: fx.Node) -> list[fx.Node]:
        """The values a stage must hold to have `value`: itself, or what it is recomputed from."""
        if value not in rematerialized:
            return [value]
        return [source for parent in value.all_input_nodes for source in sources(parent)]

    # last_use[v]: the last stage that reads value v (the output counts as the last stage).
    last_use: dict[fx.Node, int] = {}
    for node in graph.nodes:
        reader = num_stages - 1 if node.op == "output" else stage_of.get(node)
        if reader is None:
            continue
        for value in (source for parent in node.all_input_nodes for source in sources(parent)):
            last_use[value] = max(last_use.get(value, reader), reader)
    # Values crossing the cut between stage k-1 and stage k, in graph order.
    crossing = [
        [node for node in graph.nodes if node in last_use and defined_in(node) < k <= last_use[node]]
        for k in range(num_stages + 1)
    ]
    crossing[0] = placeholders
    modules = []
    for stage in range(num_stages):
        stage_graph = _stage_graph(
            graph, stage_of, rematerialized, stage, num_stages, crossing[stage], crossing[stage + 1]
        )
        modules.append(fx.GraphModule(model, stage_graph, class_name=f"PipelineStage{stage}Module"))
    return modules
