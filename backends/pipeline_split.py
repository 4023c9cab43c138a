"""Cut a model into pipeline stages at the plan's layer boundaries, keeping original FQNs.

    >>> split = split_model(model, [["tok_emb", "pos_emb", "drop", "blocks.0", "blocks.1"],
    ...                             ["blocks.2", "blocks.3", "ln_f", "lm_head"]])   # doctest: +SKIP
    >>> split.stage_modules[1]                      # a GraphModule: (x,) -> logits   # doctest: +SKIP
    >>> dict(split.stage_modules[1].named_parameters())["lm_head.weight"]          # doctest: +SKIP

Why not `torch.distributed.pipelining.pipeline()`: it traces with `torch.export` and
unflattens each stage into `InterpreterModule`s running ATen graphs, so a stage holds no
`nn.Linear` / `nn.Embedding` for `parallelize_module` (its Colwise/Rowwise styles accept
only those; checked on gpt-tiny: `blocks.0.attn.c_attn` becomes an InterpreterModule).
Here the model is traced with `torch.fx` keeping every plan layer a leaf `call_module`,
so each stage is a small `GraphModule` whose glue (adds, position ids, ...) is traced
and whose layers are the user's own eager modules at their original paths
("blocks.3.attn.c_attn"), which is what tensor parallel, recompute, FSDP and the full
state dict need. Tied parameters are treated as `pipeline()` does (a copy per stage).

Stage k's graph takes the values live across the cut before it as positional inputs
(stage 0 takes the model's inputs) and returns those live across the cut after it;
a value made in stage i and used in stage j > i + 1 is passed through the stages
in between, since a pipeline stage only receives from its predecessor. Only tensors
travel: attribute reads and shape arithmetic (`T = tokens.shape[1]`) are recomputed in
each stage that needs them, from the tensors it receives. A cut falls
right before the first layer of a stage, as `SplitPoint.BEGINNING` would put it.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

# Wrappers that insert a path component without changing what a parameter is.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def original_fqn(name: str) -> str:
    """The model's own name of a stage parameter: wrapper path components removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass
class ModelSplit:
    """The stage graphs of one model; modules are shared with the model until copied."""

    stage_modules: list[fx.GraphModule]
    """Stage index -> GraphModule whose parameters keep the model's FQNs."""
    tied_groups: list[list[str]]
    """Groups (>= 2 names) of parameter FQNs that are one tensor in the model."""
    unreached_state: dict[str, torch.Tensor]
    """State-dict entries no stage uses (modules never called in forward)."""

    def holders(self, names: list[str]) -> list[int]:
        """Stages whose module holds any of `names`."""
        return [index for index, module in enumerate(self.stage_modules)
                if any(name in dict(module.named_parameters(remove_duplicate=False)) for name in names)]

    def local_copy(self, stage_index: int, device: torch.device) -> fx.GraphModule:
        """A private copy of one stage on `device` (tied parameters get their own copy)."""
        return copy.deepcopy(self.stage_modules[stage_index]).to(device)


class _LayerLeafTracer(fx.Tracer):
    """Trace through everything except the plan's layers, which stay `call_module`s."""

    def __init__(self, layer_names: set[str]):
        super().__init__()
        self.layer_names = layer_names

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname in self.layer_names or super().is_leaf_module(module, qualname)


def trace_with_layer_leaves(model: nn.Module, layer_names: set[str]) -> fx.Graph:
    """fx graph of `model.forward` with each named layer a leaf; a ValueError names what failed."""
    missing = sorted(name for name in layer_names if _find_module(model, name) is None)
    if missing:
        raise ValueError(f"plan stages name layers that are not modules of {type(model).__name__}: {missing}")
    try:
        return _LayerLeafTracer(layer_names).trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, ...: say where
        raise ValueError(f"cannot trace {type(model).__name__}.forward with torch.fx for pipeline splitting "
                         f"(plan layers stay leaf modules): {type(error).__name__}: {error}") from error


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "get_device"})
SHAPE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                              operator.truediv, operator.mod, operator.neg})


def _rematerialized_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes every stage that reads them recomputes instead of receiving: attribute reads
    (`get_attr`) and shape arithmetic (`T = tokens.shape[1]`, `x.size(0) // 2`), whose
    values are not tensors and so cannot travel between pipeline stages."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" \
                or (node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES) \
                or (node.op == "call_method" and node.target in SHAPE_METHODS) \
                or (node.op == "call_function" and node.target in SHAPE_ARITHMETIC and node.all_input_nodes
                    and all(value in found for value in node.all_input_nodes)):
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
                raise ValueError(f"layer {node.target!r} is planned on stage {stage} but runs after layer "
                                 f"{last_layer!r} of stage {current}: stages must follow execution order")
            current, last_layer = stage, node.target
        stage_of[node] = current
    called = {node.target for node in stage_of if node.op == "call_module"}
    never_called = sorted(set(stage_of_layer) - called)
    if never_called:
        raise ValueError(f"plan layers {never_called} are never called by forward, so they cannot mark stage cuts")
    return stage_of


def _stage_graph(graph: fx.Graph, stage_of: dict[fx.Node, int], rematerialized: set[fx.Node], stage: int,
                 num_stages: int, live_in: list[fx.Node], live_out: list[fx.Node]) -> fx.Graph:
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


def split_model(model: nn.Module, stage_layers: list[list[str]]) -> ModelSplit:
    """Cut `model` into len(stage_layers) GraphModules; stage i runs layers stage_layers[i]."""
    stage_of_layer = {name: index for index, names in enumerate(stage_layers) for name in names}
    graph = trace_with_layer_leaves(model, set(stage_of_layer))
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
    crossing = [[node for node in graph.nodes if node in last_use and defined_in(node) < k <= last_use[node]]
                for k in range(num_stages + 1)]
    crossing[0] = placeholders
    modules = []
    for stage in range(num_stages):
        stage_graph = _stage_graph(graph, stage_of, rematerialized, stage, num_stages,
                                   crossing[stage], crossing[stage + 1])
        modules.append(fx.GraphModule(model, stage_graph, class_name=f"PipelineStage{stage}Module"))

    used = {name for module in modules for name in module.state_dict()}
    unreached = {name: value.detach().clone() for name, value in model.state_dict().items() if name not in used}
    return ModelSplit(modules, _tied_parameter_groups(model), unreached)


def _tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one Parameter object, e.g. [["tok_emb.weight", "lm_head.weight"]]."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    return [names for names in names_of.values() if len(names) > 1]
