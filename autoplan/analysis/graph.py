"""The dataflow graph a trace records: nodes owned by modules, layer calls, what tp splits.

>>> from autoplan import zoo
>>> from autoplan.analysis.trace import trace_model
>>> job = zoo.build("gpt-tiny", batch_size=1, device="meta")
>>> traced = trace_model(job.module, job.example_inputs)
>>> [(node.target, node.module, node.is_module) for node in traced.graph[:2]]
[('arange', '', False), ('Embedding', 'tok_emb', True)]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import fx
from torch.utils._pytree import tree_leaves, tree_map_only

from autoplan.schema.plan import TPSite


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(eq=False)
class OpNode:
    """One node of the dataflow graph: a leaf-module call or a torch call outside leaf modules."""

    target: str
    """The leaf module's class name ("Linear") or the torch function's name ("view", "scaled_dot_product_attention")."""
    module: str
    """Path of the module that ran it: the leaf module itself, or the module whose forward made the call."""
    layer: str | None
    """The layer it belongs to; None for glue code in the root between layers."""
    args: tuple
    kwargs: dict
    output: Any
    is_module: bool
    func: Any = None
    """The torch function called (None for a leaf-module call)."""

    @property
    def inputs(self) -> list[torch.Tensor]:
        return _tensors((self.args, self.kwargs))

    @property
    def outputs(self) -> list[torch.Tensor]:
        return _tensors(self.output)


@dataclass
class LayerCall:
    """The first call of a layer during tracing: meta inputs and output."""

    args: tuple
    kwargs: dict
    output: Any


@dataclass
class LayerTP:
    """How tensor parallelism splits one layer; paths are full module paths."""

    sites: dict[str, TPSite] = field(default_factory=dict)
    divisors: dict[str, int] = field(default_factory=dict)
    divide_attrs: dict[str, int] = field(default_factory=dict)
    colwise_groups: list[list[str]] = field(default_factory=list)
    """Colwise (and vocab-output) Linears grouped by the tensor they read: each group costs one
    all-reduce of that input's gradient in backward."""

    def renamed(self, old: str, new: str) -> LayerTP:
        """The same analysis for a repeated block at path `new` (analysed at `old`)."""

        def move(key: str) -> str:
            # keys are module paths, "path.attr" (divide attrs) or "path kind" (divisors)
            if old and (key == old or key.startswith((old + ".", old + " "))):
                return new + key[len(old) :]
            return key

        return LayerTP(
            {move(k): v for k, v in self.sites.items()},
            {move(k): v for k, v in self.divisors.items()},
            {move(k): v for k, v in self.divide_attrs.items()},
            [[move(p) for p in group] for group in self.colwise_groups],
        )


@dataclass
class TracedModel:
    """What `trace_model` learned; every tensor in it is on the meta device."""

    module: nn.Module
    layers: list[str]
    """Units pipeline stages are cut between (module paths), in execution order."""
    signatures: dict[str, str]
    """Layer -> hash of its structure, shapes and dtypes; equal for repeated blocks."""
    graph: list[OpNode]
    """The dataflow graph in execution order."""
    calls: dict[str, LayerCall]
    tp: dict[str, LayerTP]
    """Layer -> its tensor-parallel structure."""
    tied_parameters: list[list[str]]
    """Groups of parameter names sharing one tensor."""
    meta_state: dict[str, torch.Tensor]
    """Parameter and buffer name -> the meta tensor standing in for it (tied names share one)."""
    inputs: tuple
    output: Any
    num_calls: dict[str, int] = field(default_factory=dict)
    """Layer -> how many times forward calls it (2 for T5's shared embedding); its costs count that often."""
    glue_flops: dict[str, float] = field(default_factory=dict)
    """Module path -> forward FLOPs its own code ran outside every layer (no layer accounts for them)."""
    module_calls: dict[str, tuple[tuple, dict]] = field(default_factory=dict)
    """Module path -> (args, kwargs) of its first call (not for modules inside replayed repeats)."""
    sequence_parallel_blocker: str | None = None
    """Why sequence parallelism cannot run on this model (None: it can, or nothing is split)."""
    layer_reads: dict[str, set[str]] = field(default_factory=dict)
    """Layer -> the layers whose outputs its inputs depend on (through the code between layers):
    the edges of the layer graph (`autoplan.analysis.stage_cuts`)."""
    layer_derives: dict[str, set[str]] = field(default_factory=dict)
    """Layer -> the layers whose outputs its own output depends on (what a parameter-free
    layer, run again in a later stage, passes on)."""
    output_reads: set[str] = field(default_factory=set)
    """The layers whose outputs the model's output depends on."""

    @property
    def tp_sites(self) -> dict[str, TPSite]:
        return {path: site for layer in self.layers for path, site in self.tp[layer].sites.items()}

    @property
    def tp_divisors(self) -> dict[str, int]:
        return {key: value for layer in self.layers for key, value in self.tp[layer].divisors.items()}

    @property
    def tp_divide_attrs(self) -> dict[str, int]:
        return {key: value for layer in self.layers for key, value in self.tp[layer].divide_attrs.items()}

    def fx_graph(self) -> fx.Graph:
        """The dataflow graph as a `torch.fx.Graph` over the model: placeholders for the
        inputs, `get_attr` for parameters and buffers, `call_module` for leaf modules,
        `call_function` for torch calls, and `call_module` of the whole layer for a repeated
        layer whose twin's trace stands for it. Every node's `meta` holds `module` (the
        module that ran it), `layer` (None between layers) and `val` (its meta output).

            >>> graph = traced.fx_graph()                                   # doctest: +SKIP
            >>> {n.meta["layer"] for n in graph.nodes if n.op == "call_function"}   # doctest: +SKIP
        """
        # any module can own a graph (fx reads its attributes); torch annotates GraphModule
        graph = fx.Graph(owning_module=self.module)  # type: ignore[arg-type]
        made: dict[int, fx.Node] = {}
        names = {id(tensor): name for name, tensor in self.meta_state.items()}
        replayed = {
            id(t): layer
            for layer, call in self.calls.items()
            if layer in self.replayed_layers
            for t in _tensors(call.output)
        }

        def register(value: Any, node: fx.Node) -> None:
            tensors = _tensors(value)
            for index, tensor in enumerate(tensors):
                if id(tensor) in made:
                    continue
                if isinstance(value, torch.Tensor):
                    made[id(tensor)] = node
                else:  # the index-th tensor leaf of a structured output
                    made[id(tensor)] = graph.call_function(operator.getitem, (node, index))
                    made[id(tensor)].meta.update(module=node.meta["module"], layer=node.meta["layer"], val=tensor)

        def node_of(tensor: torch.Tensor) -> fx.Node:
            if id(tensor) not in made:
                if id(tensor) in names:
                    made[id(tensor)] = graph.get_attr(names[id(tensor)])
                    made[id(tensor)].meta.update(module="", layer=None, val=tensor)
                elif id(tensor) in replayed:
                    layer = replayed[id(tensor)]
                    call = self.calls[layer]
                    node = graph.call_module(layer, *lift(call.args, call.kwargs))
                    node.meta.update(module=layer, layer=layer, val=call.output)
                    register(call.output, node)
                else:  # made by code the trace does not see (a hook's own tensors)
                    node = graph.placeholder(f"external_{len(made)}")
                    node.meta.update(module="", layer=None, val=tensor)
                    made[id(tensor)] = node
            return made[id(tensor)]

        def lift(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return tree_map_only(torch.Tensor, node_of, (tuple(args), dict(kwargs)))

        for index, tensor in enumerate(_tensors(self.inputs)):
            made[id(tensor)] = graph.placeholder(f"input_{index}")
            made[id(tensor)].meta.update(module="", layer=None, val=tensor)
        for op in self.graph:
            args, kwargs = lift(op.args, op.kwargs)
            node = (
                graph.call_module(op.module, args, kwargs)
                if op.is_module
                else graph.call_function(op.func, args, kwargs)
            )
            node.meta.update(module=op.module, layer=op.layer, val=op.output)
            register(op.output, node)
        graph.output(tree_map_only(torch.Tensor, node_of, self.output))
        return graph

    @property
    def replayed_layers(self) -> set[str]:
        """Layers whose first call no op of `graph` records (a twin's trace stands for it)."""
        recorded = {node.layer for node in self.graph}
        return {layer for layer in self.layers if layer not in recorded}

    def representative(self, layer: str) -> str:
        """The first layer with the same signature (the one that is analysed and profiled)."""
        signature = self.signatures[layer]
        return next(other for other in self.layers if self.signatures[other] == signature)
