"""Trace a model on the meta device: its layers, their dataflow, and how tensor parallelism splits it.

    >>> from autoplan import zoo
    >>> job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    >>> traced = trace_model(job.module, job.example_inputs)
    >>> traced.layers[:4]
    ['tok_emb', 'pos_emb', 'drop', 'blocks.0']
    >>> traced.tp_sites["blocks.0.attn.c_attn"].fused_sizes
    [64, 64, 64]

How. One forward pass on meta tensors: parameters and buffers are swapped for meta
copies with `torch.func.functional_call`, so a model on any device traces without
touching its weights, and a 1T-parameter model traces in well under a second. A
TorchFunctionMode records every torch call made outside leaf modules, and module hooks
record every leaf-module call; together they are the dataflow graph (`TracedModel.graph`):
each node names the module that ran it (the innermost module on the call stack, as
`nn_module_stack` does in torch.export) and holds its real meta input and output tensors.

Why not torch.export: it gives the same information (ops owned by modules) but costs
seconds per block on a huge model, and it erases the Python-level calls this module
reads: `view(B, T, self.num_heads, head_dim)` (head counts and the attributes behind
them) and `chunk(3)` of a fused projection.

Tensor parallelism is found from dataflow, not names (`_SplitSearch`): starting from the
Linears that read one tensor, a "split" tensor dimension is propagated through
elementwise ops, reshapes into heads, attention and transposes until every path ends
in a Linear that reads the split dimension as its input features (rowwise). Anything
else consuming a split tensor (a norm, a residual add, the layer output) rejects the
region. Repeated blocks (equal `signature`) are analysed once and the result is copied.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

from autoplan.plan import TPSite

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_NORMS = (nn.LayerNorm, nn.RMSNorm)
_ELEMENTWISE_MODULES = (nn.modules.dropout._DropoutNd, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid,
                        nn.Identity, nn.Mish, nn.LeakyReLU)
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_CHUNKS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", "permute", "t", "T", "mT"}
_MATMULS = {"matmul", "__matmul__", "bmm"}
_DIM_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "softmax",
                   "log_softmax", "cumsum", "norm", "var", "std", "logsumexp", "topk", "sort"}


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

    def renamed(self, old: str, new: str) -> "LayerTP":
        """The same analysis for a repeated block at path `new` (analysed at `old`)."""
        def move(key: str) -> str:
            # keys are module paths, "path.attr" (divide attrs) or "path kind" (divisors)
            if old and (key == old or key.startswith((old + ".", old + " "))):
                return new + key[len(old):]
            return key

        return LayerTP({move(k): v for k, v in self.sites.items()},
                       {move(k): v for k, v in self.divisors.items()},
                       {move(k): v for k, v in self.divide_attrs.items()},
                       [[move(p) for p in group] for group in self.colwise_groups])


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

    @property
    def tp_sites(self) -> dict[str, TPSite]:
        return {path: site for layer in self.layers for path, site in self.tp[layer].sites.items()}

    @property
    def tp_divisors(self) -> dict[str, int]:
        return {key: value for layer in self.layers for key, value in self.tp[layer].divisors.items()}

    @property
    def tp_divide_attrs(self) -> dict[str, int]:
        return {key: value for layer in self.layers for key, value in self.tp[layer].divide_attrs.items()}

    def representative(self, layer: str) -> str:
        """The first layer with the same signature (the one that is analysed and profiled)."""
        signature = self.signatures[layer]
        return next(other for other in self.layers if self.signatures[other] == signature)


def trace_model(module: nn.Module, example_inputs: tuple) -> TracedModel:
    """Trace `module` on meta tensors: layers, dataflow graph, repeated blocks, tensor-parallel sites.

    `example_inputs` may live on any device (they are replaced by meta tensors of the same
    shape); a model that cannot run on meta tensors raises ValueError naming the module and
    the operation.

        >>> traced = trace_model(model, (tokens,))        # doctest: +SKIP
        >>> traced.layers, traced.tp_sites, traced.tp_divisors  # doctest: +SKIP
    """
    inputs = tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x
                   for x in example_inputs)
    meta_state = _meta_state(module)
    paths = {mod: path for path, mod in module.named_modules()}
    recorder = _Recorder(paths, set(_layer_candidates(module)))
    with recorder.hooked(module), recorder, torch.no_grad():
        output = recorder.run(module, meta_state, inputs)
    layers = recorder.layer_order
    signatures = {layer: _signature(module.get_submodule(layer), layer, recorder.nodes_of(layer),
                                    recorder.calls[layer]) for layer in layers if layer not in recorder.replayed}
    signatures.update({layer: signatures[twin] for layer, twin in recorder.replayed.items()})
    signatures = {layer: signatures[layer] for layer in layers}
    traced = TracedModel(module, layers, signatures, recorder.nodes, recorder.calls, {},
                         _tied_parameters(module), meta_state, inputs, output)
    _find_tensor_parallel(traced, recorder)
    return traced


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> meta stand-in for every parameter and buffer; tied names share one stand-in."""
    stand_ins: dict[int, torch.Tensor] = {}
    state = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) not in stand_ins:
            stand_ins[id(tensor)] = tensor if tensor.is_meta else torch.empty_like(tensor, device="meta")
        state[name] = stand_ins[id(tensor)]
    return state


def _tied_parameters(module: nn.Module) -> list[list[str]]:
    names_of: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return [names for names in names_of.values() if len(names) > 1]


def _layer_candidates(root: nn.Module) -> list[str]:
    """Expand the root, containers (ModuleList/Dict, Sequential) and trunks (a non-item module
    holding a container, like Hugging Face's `model.model`); everything else is one layer."""
    def expand(module: nn.Module, path: str, is_item: bool) -> list[str]:
        children = list(module.named_children())
        is_container = isinstance(module, _CONTAINERS)
        is_trunk = not is_item and any(isinstance(child, _CONTAINERS) for _, child in children)
        if children and (path == "" or is_container or is_trunk):
            return [layer for name, child in children for layer in expand(child, _join(path, name), is_container)]
        return [path]

    return expand(root, "", False)


class _TraceError(Exception):
    def __init__(self, module: str, op: str, cause: BaseException):
        super().__init__(module, op, cause)
        self.module, self.op, self.cause = module, op, cause


class _Recorder(TorchFunctionMode):
    """Records torch calls (outside leaf modules) and leaf-module calls into OpNodes."""

    def __init__(self, paths: dict[nn.Module, str], candidates: set[str]):
        super().__init__()
        self.paths, self.candidates = paths, candidates
        self.leaves = {module for module in paths if next(module.children(), None) is None}
        self.nodes: list[OpNode] = []
        self.calls: dict[str, LayerCall] = {}
        self.layer_order: list[str] = []
        self.stack: list[tuple[str, tuple, dict]] = []
        self.leaf_depth = 0
        self.current_layer: str | None = None
        self.outputs_by_key: dict[tuple, tuple[str, Any]] = {}
        self.static_keys: dict[nn.Module, tuple] = {}
        self.in_hook = False
        self.replayed: dict[str, str] = {}
        """Layer -> the twin layer whose output it replayed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_hook:  # shapes read by our own hooks
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # a property: Tensor.T, Tensor.mT, Tensor.shape
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        try:
            output = func(*args, **kwargs)
        except _TraceError:
            raise
        except Exception as error:
            raise _TraceError(self.stack[-1][0] if self.stack else "", name, error) from error
        if self.leaf_depth == 0 and _tensors(output):
            self.nodes.append(OpNode(name, self.stack[-1][0] if self.stack else "", self.current_layer,
                                     args, kwargs, output, False))
        return output

    def run(self, module: nn.Module, state: dict[str, torch.Tensor], inputs: tuple) -> Any:
        try:
            return torch.func.functional_call(module, state, inputs, tie_weights=True)
        except _TraceError as error:
            where = error.module or "<root>"
            raise ValueError(f"cannot trace {type(module).__name__}: module {where!r} "
                             f"({type(module.get_submodule(error.module)).__name__}) failed in operation "
                             f"{error.op!r} on meta tensors: {error.cause}") from None
        except Exception as error:
            where = self.stack[-1][0] if self.stack else "<root>"
            raise ValueError(f"cannot trace {type(module).__name__}: module {where!r} failed outside a torch "
                             f"operation on meta tensors: {type(error).__name__}: {error}") from None

    @contextmanager
    def hooked(self, root: nn.Module) -> Iterator[None]:
        """Install the hooks, and make every repeated layer replay its twin's output (see `replay`)."""
        handles, patched = [], []
        twins: dict[tuple, list[nn.Module]] = {}
        for path in self.candidates:
            layer = root.get_submodule(path)
            self.static_keys[layer] = _static_key(layer)
            twins.setdefault(self.static_keys[layer], []).append(layer)
        try:
            for module in root.modules():
                handles.append(module.register_forward_pre_hook(self.enter, with_kwargs=True))
                handles.append(module.register_forward_hook(self.leave))
            for key, layers in twins.items():
                for layer in layers if len(layers) > 1 else ():
                    layer.forward = functools.partial(self.replay, layer, key)
                    patched.append(layer)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in patched:
                del layer.forward

    def replay(self, layer: nn.Module, key: tuple, *args, **kwargs) -> Any:
        """Forward of a repeated layer: when a layer with the same class, state shapes and
        attributes already ran on inputs of the same shapes, return fresh meta tensors shaped
        like its output instead of running it again (96 GPT-3 blocks cost one)."""
        self.in_hook = True
        seen = self.outputs_by_key.get((key, _describe_inputs(args, kwargs)))
        self.in_hook = False
        if seen is None:
            return type(layer).forward(layer, *args, **kwargs)
        twin, output = seen
        self.replayed[self.paths[layer]] = twin
        self.in_hook = True  # the tensors made here are not part of the graph
        try:
            return tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), output)
        finally:
            self.in_hook = False

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        path = self.paths[module]
        self.stack.append((path, args, kwargs))
        if self.current_layer is None and path in self.candidates:
            self.current_layer = path
            if path not in self.calls:
                self.layer_order.append(path)
        if module in self.leaves:
            self.leaf_depth += 1

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        path, args, kwargs = self.stack.pop()
        if module in self.leaves:
            self.leaf_depth -= 1
            if self.leaf_depth == 0 and _tensors(output):
                self.nodes.append(OpNode(type(module).__name__, path, self.current_layer, args, kwargs, output, True))
        if path == self.current_layer:
            self.calls.setdefault(path, LayerCall(args, kwargs, output))
            self.in_hook = True
            self.outputs_by_key.setdefault((self.static_keys[module], _describe_inputs(args, kwargs)), (path, output))
            self.in_hook = False
            self.current_layer = None

    def nodes_of(self, layer: str) -> list[OpNode]:
        return [node for node in self.nodes if node.layer == layer]


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)}:{tensor.dtype}"


def _describe_inputs(args: tuple, kwargs: dict) -> tuple:
    return tuple(_describe(leaf) if isinstance(leaf, torch.Tensor) else repr(leaf)
                 for leaf in tree_leaves((args, kwargs)))


def _static_key(layer: nn.Module) -> tuple:
    """What decides a layer's computation besides its inputs: class, state shapes and the
    plain attributes of every submodule (a layer_idx or attention type makes twins differ)."""
    state = tuple((name, _describe(t)) for name, t in (*layer.named_parameters(), *layer.named_buffers()))
    attributes = tuple((path, type(sub).__qualname__, name, value)
                       for path, sub in layer.named_modules() for name, value in vars(sub).items()
                       if not name.startswith("_") and name != "training"
                       and isinstance(value, (int, float, str, bool, type(None))))
    return type(layer), state, attributes


def _signature(module: nn.Module, layer: str, nodes: list[OpNode], call: LayerCall) -> str:
    """Hash of the layer's class, state shapes, input shapes and op sequence (module paths relative)."""
    parts = [type(module).__qualname__]
    parts += [f"{name}={_describe(t)}" for name, t in (*module.named_parameters(), *module.named_buffers())]
    parts += [_describe(t) for t in _tensors((call.args, call.kwargs))]
    for node in nodes:
        relative = node.module[len(layer):] if layer else node.module
        parts.append(f"{node.target}@{relative}->" + ",".join(_describe(t) for t in node.outputs))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- tensor parallelism ------------------------------------------------------------------------

class _Reject(Exception):
    """A region cannot be split; `needs` is a replicated tensor that would have to be split too."""

    def __init__(self, reason: str, needs: torch.Tensor | None = None):
        super().__init__(reason)
        self.needs = needs


@dataclass
class _Region:
    colwise: list[OpNode]
    rowwise: list[OpNode] = field(default_factory=list)
    fused_sizes: dict[str, list[int]] = field(default_factory=dict)
    heads: list[tuple[str, int]] = field(default_factory=list)
    """(module that reshaped, head count) for each reshape splitting a width into heads."""
    divide_attrs: dict[str, int] = field(default_factory=dict)
    split_modules: list[str] = field(default_factory=list)
    """Leaf modules (dropout, activations) running on split tensors: no site of their own."""


def _find_tensor_parallel(traced: TracedModel, recorder: _Recorder) -> None:
    """Fill `traced.tp`: analyse each representative layer, copy the result to its repeats."""
    flow = _ModelFlow(traced)
    analysed: dict[str, LayerTP] = {}
    for layer in traced.layers:
        representative = traced.representative(layer)
        if representative not in analysed:
            search = _SplitSearch(recorder.nodes_of(layer), traced.calls[layer], flow.producer, flow.modules)
            analysed[representative] = search.run()
            flow.add_module_sites(analysed[representative], search)
        traced.tp[layer] = analysed[representative].renamed(representative, layer)

    if all(site.style == "sequence_parallel" for layer_tp in traced.tp.values() for site in layer_tp.sites.values()):
        for layer_tp in traced.tp.values():  # nothing is split, so nothing runs sequence-parallel
            layer_tp.sites.clear()


class _ModelFlow:
    """Who produces and who reads every traced tensor; the model's inputs, outputs and vocabularies."""

    def __init__(self, traced: TracedModel):
        self.modules = dict(traced.module.named_modules())
        self.producer = {id(t): node for node in traced.graph for t in node.outputs}
        self.consumers: dict[int, list[OpNode]] = {}
        for node in traced.graph:
            for t in node.inputs:
                self.consumers.setdefault(id(t), []).append(node)
        self.model_outputs = {id(t) for t in _tensors(traced.output)}
        model_inputs = {id(t) for t in _tensors(traced.inputs)}
        self.vocab_sizes = {node.module: self.modules[node.module].num_embeddings for node in traced.graph
                            if node.is_module and isinstance(self.modules[node.module], nn.Embedding)
                            and id(node.inputs[0]) in model_inputs}
        """Embeddings indexed by the model's own input (tokens, not positions) -> vocabulary size."""

    def add_module_sites(self, layer_tp: LayerTP, search: "_SplitSearch") -> None:
        """Sites that are whole modules: vocab-split embeddings and output heads, and the norms
        and dropouts outside split regions on (batch, sequence, ...) tensors (sequence parallel)."""
        for node in search.nodes:
            module = self.modules[node.module] if node.is_module else None
            if node.module in self.vocab_sizes:
                layer_tp.sites[node.module] = TPSite(style="vocab_embedding")
                layer_tp.divisors[f"{node.module} vocab"] = self.vocab_sizes[node.module]
            elif (isinstance(module, nn.Linear) and module.out_features in self.vocab_sizes.values()
                  and node.module not in layer_tp.sites and self.feeds_output(node)):
                layer_tp.sites[node.module] = TPSite(style="vocab_output")
                layer_tp.divisors[f"{node.module} vocab"] = module.out_features
                layer_tp.colwise_groups.append([node.module])
            elif (isinstance(module, (*_NORMS, nn.modules.dropout._DropoutNd)) and node.module not in search.inside
                  and node.inputs[0].dim() >= 3):
                layer_tp.sites[node.module] = TPSite(style="sequence_parallel")

    def feeds_output(self, node: OpNode) -> bool:
        """Whether the node's output reaches a model output without passing another Linear or Embedding."""
        frontier, seen = list(node.outputs), set()
        while frontier:
            tensor = frontier.pop()
            if id(tensor) in self.model_outputs:
                return True
            for user in self.consumers.get(id(tensor), []):
                if id(user) not in seen and not (user.is_module and isinstance(self.modules[user.module],
                                                                                (nn.Linear, nn.Embedding))):
                    seen.add(id(user))
                    frontier.extend(user.outputs)
        return False


class _SplitSearch:
    """Finds the colwise/rowwise regions of one layer by propagating a split dimension."""

    def __init__(self, nodes: list[OpNode], call: LayerCall, producer: dict[int, OpNode],
                 modules: dict[str, nn.Module]):
        self.nodes, self.call, self.producer, self.modules = nodes, call, producer, modules
        self.in_layer = {id(node) for node in nodes}
        self.inside: set[str] = set()
        """Leaf modules that run on split tensors (an attention dropout): no site of their own."""
        self.groups: dict[int, list[OpNode]] = {}
        for node in nodes:
            if node.is_module and isinstance(modules[node.module], nn.Linear):
                self.groups.setdefault(id(node.inputs[0]), []).append(node)

    def run(self) -> LayerTP:
        result = LayerTP()
        assigned: set[int] = set()
        for group in self.groups.values():
            if any(id(node) in assigned for node in group):
                continue
            region = self._grow(group, assigned)
            if region is None:
                continue
            assigned.update(id(node) for node in (*region.colwise, *region.rowwise))
            self._record(region, result)
            self.inside.update(region.split_modules)
        return result

    def _grow(self, seeds: list[OpNode], assigned: set[int]) -> _Region | None:
        """Propagate from `seeds`; pull in the Linears behind any tensor that must be split too."""
        seeds = list(seeds)
        while True:
            try:
                return self._propagate(seeds)
            except _Reject as reject:
                if reject.needs is None:
                    return None
                extra = [node for node in self._linear_ancestors(reject.needs)
                         if id(node) not in assigned and node not in seeds]
                if not extra:
                    return None
                for node in extra:
                    seeds.extend(other for other in self.groups[id(node.inputs[0])] if other not in seeds)

    def _linear_ancestors(self, tensor: torch.Tensor) -> list[OpNode]:
        found, frontier, seen = [], [tensor], set()
        while frontier:
            node = self.producer.get(id(frontier.pop()))
            if node is None or id(node) in seen or id(node) not in self.in_layer:
                continue
            seen.add(id(node))
            mod = self.modules[node.module] if node.is_module else None
            if isinstance(mod, nn.Linear):
                found.append(node)
            elif not isinstance(mod, nn.Embedding):
                frontier.extend(node.inputs)
        return found

    def _propagate(self, seeds: list[OpNode]) -> _Region:
        region = _Region(colwise=list(seeds))
        seed_ids = {id(node) for node in seeds}
        split: dict[int, int] = {}
        for node in self.nodes:
            if id(node) in seed_ids:
                if id(node.inputs[0]) in split:
                    raise _Reject("a colwise Linear reads a split tensor")
                out = node.outputs[0]
                split[id(out)] = out.dim() - 1
                continue
            dims = [split.get(id(t)) for t in node.inputs]
            if all(d is None for d in dims):
                continue
            if node.is_module:
                self._through_module(node, dims, split, region)
            else:
                self._through_function(node, split, seed_ids, region)
        if any(id(t) in split for t in _tensors(self.call.output)):
            raise _Reject("a split tensor leaves the layer")
        if not region.rowwise:
            raise _Reject("no rowwise Linear closes the region")
        return region

    def _through_module(self, node: OpNode, dims: list, split: dict, region: _Region) -> None:
        mod = self.modules[node.module]
        d = next(d for d in dims if d is not None)
        x = node.inputs[0]
        if isinstance(mod, nn.Linear) and d == x.dim() - 1:
            region.rowwise.append(node)
            return
        if isinstance(mod, _NORMS) and d < x.dim() - len(mod.normalized_shape):
            split[id(node.outputs[0])] = d  # a per-head norm (q/k norm) keeps heads split
        elif isinstance(mod, _ELEMENTWISE_MODULES):
            split[id(node.outputs[0])] = d
        else:
            raise _Reject(f"{type(mod).__name__} at {node.module} reads a split tensor")
        region.split_modules.append(node.module)

    def _through_function(self, node: OpNode, split: dict, seed_ids: set[int], region: _Region) -> None:
        name = node.target
        inputs = node.inputs
        outputs = node.outputs
        if name == "scaled_dot_product_attention" or name in _MATMULS:
            operands = inputs[:3] if name == "scaled_dot_product_attention" else inputs[:2]
            dims = {split.get(id(t)) for t in operands}
            d = next(d for d in dims if d is not None)
            if d >= operands[0].dim() - 2:
                raise _Reject(f"{name} contracts over a split dimension")
            for t in operands:
                if split.get(id(t)) is None:
                    raise _Reject(f"{name} mixes split and replicated operands", needs=t)
            split[id(outputs[0])] = d
            return
        split_inputs = [(t, split[id(t)]) for t in inputs if id(t) in split]
        x, d = split_inputs[0]
        if name in _CHUNKS:
            self._through_chunk(node, x, d, split, seed_ids, region)
        elif name in _TRANSPOSES:
            split[id(outputs[0])] = _transposed_dim(node, x, d)
        elif name == "repeat_interleave":
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
            if dim is None or dim % x.dim() != d:
                raise _Reject("repeat_interleave across a non-split dimension")
            split[id(outputs[0])] = d
        elif name in ("stack", "cat"):
            self._through_concat(node, name, d, split)
        else:
            self._through_generic(node, name, x, d, split, region)

    def _through_chunk(self, node, x, d, split, seed_ids, region) -> None:
        dim_index = 1 if node.target == "unbind" else 2   # unbind(x, dim); chunk/split(x, n, dim)
        dim = node.kwargs.get("dim", node.args[dim_index] if len(node.args) > dim_index else 0) % x.dim()
        outputs = node.outputs
        if dim == d:
            source = self.producer.get(id(x))
            if source is None or id(source) not in seed_ids:
                raise _Reject("chunking a split dimension that is not a fused projection")
            region.fused_sizes[source.module] = [t.shape[d] for t in outputs]
            for t in outputs:
                split[id(t)] = d
            return
        for t in outputs:
            split[id(t)] = d - 1 if node.target == "unbind" and dim < d else d

    def _through_concat(self, node, name, d, split) -> None:
        tensors = node.inputs
        for t in tensors:
            if split.get(id(t)) != d:
                raise _Reject(f"{name} of split and replicated tensors", needs=t)
        out = node.outputs[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % out.dim()
        if name == "cat" and dim == d:
            raise _Reject("cat along the split dimension")
        split[id(out)] = d + 1 if name == "stack" and dim <= d else d

    def _through_generic(self, node, name, x, d, split, region) -> None:
        outputs = node.outputs
        if len(outputs) != 1:
            raise _Reject(f"{name} of a split tensor")
        out = outputs[0]
        if name in _DIM_REDUCTIONS or "norm" in name:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            reduced = {dim % x.dim()} if isinstance(dim, int) else {i % x.dim() for i in dim or ()}
            if "norm" in name or not reduced or d in reduced:
                raise _Reject(f"{name} reduces over a split dimension")
        try:
            broadcast = torch.broadcast_shapes(*(t.shape for t in node.inputs))
        except RuntimeError:
            broadcast = None
        if broadcast == out.shape and name not in _RESHAPES:
            d_out = d + out.dim() - x.dim()
            for t in node.inputs:
                aligned = d_out - (out.dim() - t.dim())
                if aligned >= 0 and t.shape[aligned] != 1 and split.get(id(t)) != aligned:
                    raise _Reject(f"{name} mixes split and replicated operands", needs=t)
            split[id(out)] = d_out
            return
        if len(node.inputs) != 1:
            raise _Reject(f"{name} of a split tensor and other tensors")
        mapped = _reshaped_dim(tuple(x.shape), d, tuple(out.shape), reshape=name in _RESHAPES)
        if mapped is None:
            raise _Reject(f"{name} moves the split dimension")
        d_out, changed = mapped
        if changed == "heads":
            region.heads.append((node.module, out.shape[d_out]))
        if changed:
            self._note_divide_attrs(node, out, d_out, region)
        split[id(out)] = d_out

    def _note_divide_attrs(self, node: OpNode, out: torch.Tensor, d_out: int, region: _Region) -> None:
        """An integer attribute of the reshaping module written literally into the target shape
        at the split position (HF-style `view(bsz, q_len, self.num_heads, ...)`) must be divided."""
        shape = node.kwargs.get("shape", node.kwargs.get("size", node.args[1:]))
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = shape[0]
        if len(shape) != out.dim() or shape[d_out] != out.shape[d_out]:
            return
        owner = self.modules[node.module]
        for attr, value in vars(owner).items():
            if type(value) is int and value == out.shape[d_out]:
                region.divide_attrs[_join(node.module, attr)] = value

    def _record(self, region: _Region, result: LayerTP) -> None:
        for node in region.colwise:
            result.sites[node.module] = TPSite(style="colwise", fused_sizes=region.fused_sizes.get(node.module))
        for node in region.rowwise:
            result.sites[node.module] = TPSite(style="rowwise")
        by_input: dict[int, list[str]] = {}
        for node in region.colwise:
            by_input.setdefault(id(node.inputs[0]), []).append(node.module)
        result.colwise_groups.extend(by_input.values())
        if region.heads:
            owner, heads = max(region.heads, key=lambda item: item[1])
            result.divisors[f"{owner} heads"] = heads
            kv_heads = min(count for _, count in region.heads)
            if kv_heads != heads:
                result.divisors[f"{owner} kv_heads"] = kv_heads
        else:
            paths = [node.module for node in (*region.colwise, *region.rowwise)]
            owner = ".".join(os.path.commonprefix([path.split(".")[:-1] for path in paths]))
            width = math.gcd(*(self.modules[node.module].out_features for node in region.colwise))
            result.divisors[f"{owner} width"] = width
        result.divide_attrs.update(region.divide_attrs)


def _transposed_dim(node: OpNode, x: torch.Tensor, d: int) -> int:
    rank = x.dim()
    if node.target == "T" and rank > 2:
        return rank - 1 - d
    if node.target in ("t", "T", "mT"):
        first, second = max(rank - 2, 0), rank - 1
    elif node.target == "permute":
        order = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
        order = node.kwargs.get("dims", order)
        return [axis % rank for axis in order].index(d)
    else:
        first, second = (node.args[1] % rank, node.args[2] % rank)
    return second if d == first else first if d == second else d


def _reshaped_dim(in_shape: tuple, d: int, out_shape: tuple, reshape: bool) -> tuple[int, str] | None:
    """Where split dim `d` lands after a shape change: the output dim starting at the same
    flat offset. A reshape may split it into (heads, head_dim) -> "heads", or merge it with
    the dims after it (heads, head_dim) -> width -> "width"; other ops must keep its size."""
    prefix, size = math.prod(in_shape[:d]), in_shape[d]
    offset = 1
    for j, n in enumerate(out_shape):
        if offset == prefix and not (n == 1 and size != 1):
            if n == size:
                return j, ""
            if reshape and size % n == 0 and _covers(out_shape[j:], size):
                return j, "heads"
            if reshape and n % size == 0 and _covers(in_shape[d:], n):
                return j, "width"
            return None
        offset *= n
        if offset > prefix:
            return None
    return None


def _covers(shape: tuple, size: int) -> bool:
    """Whether a run of leading dims of `shape` multiplies to exactly `size`."""
    product = 1
    for n in shape:
        product *= n
        if product == size:
            return True
        if product > size:
            return False
    return False
