"""How tensor parallelism splits a traced model, found from its dataflow.

Tensor parallelism is found from dataflow, not names (`_SplitSearch`): starting from the
Linears that read one tensor, a "split" tensor dimension is propagated through
elementwise ops, reshapes into heads, attention and transposes until every path ends
in a Linear that reads the split dimension as its input features (rowwise). Anything
else consuming a split tensor (a norm, a residual add, the layer output) rejects the
region. Repeated blocks (equal `signature`) are analysed once and the result is copied.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TypeGuard, cast

import torch
import torch.nn as nn

from autoplan.analysis.graph import LayerCall, LayerTP, OpNode, TracedModel, _join, _tensors
from autoplan.schema.plan import TPSite

_NORMS = (nn.LayerNorm, nn.RMSNorm)
ELEMENTWISE_MODULES = (
    nn.modules.dropout._DropoutNd,
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Mish,
    nn.LeakyReLU,
)
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_CHUNKS = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", "permute", "t", "T", "mT"}
_MATMULS = {"matmul", "__matmul__", "bmm"}
_DIM_REDUCTIONS = {
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "argmax",
    "argmin",
    "prod",
    "softmax",
    "log_softmax",
    "cumsum",
    "norm",
    "var",
    "std",
    "logsumexp",
    "topk",
    "sort",
}


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2): a Linear whose weight is stored (in, out), `x @ W + b`."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_linear(module: nn.Module | None) -> TypeGuard[nn.Module]:
    """nn.Linear, or a Linear stored transposed (`is_transposed_linear`)."""
    return isinstance(module, nn.Linear) or (module is not None and is_transposed_linear(module))


def out_features(module: nn.Module) -> int:
    if is_transposed_linear(module):
        return cast(torch.Tensor, module.weight).shape[1]
    return cast(int, module.out_features)


def _is_position_wise(module: nn.Module, node: OpNode) -> bool:
    """A module applied to each position on its own, which sequence parallelism can run on a
    shard of the sequence: norms, dropout, or any other leaf with parameters (a hand-written
    RMSNorm) that keeps its input's shape and is not a Linear or an Embedding."""
    if isinstance(module, (*_NORMS, nn.modules.dropout._DropoutNd)):
        return True
    if is_linear(module) or isinstance(module, nn.Embedding) or next(module.children(), None) is not None:
        return False
    outputs = node.outputs
    return (
        next(module.parameters(recurse=False), None) is not None
        and len(outputs) == 1
        and bool(node.inputs)
        and outputs[0].shape == node.inputs[0].shape
    )


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


def find_tensor_parallel(traced: TracedModel) -> ModelFlow:
    """Fill `traced.tp`: analyse each representative layer, copy the result to its repeats."""
    flow = ModelFlow(traced)
    analysed: dict[str, LayerTP] = {}
    for layer in traced.layers:
        representative = traced.representative(layer)
        if representative not in analysed:
            search = _SplitSearch(
                [node for node in traced.graph if node.layer == layer], traced.calls[layer], flow.producer, flow.modules
            )
            analysed[representative] = search.run()
            flow.add_module_sites(analysed[representative], search)
        traced.tp[layer] = analysed[representative].renamed(representative, layer)

    return flow


class ModelFlow:
    """Who produces and who reads every traced tensor; the model's inputs, outputs and vocabularies."""

    def __init__(self, traced: TracedModel):
        self.modules = dict(traced.module.named_modules())
        self.producer = {id(t): node for node in traced.graph for t in node.outputs}
        self.consumers: dict[int, list[OpNode]] = {}
        for node in traced.graph:
            for t in node.inputs:
                self.consumers.setdefault(id(t), []).append(node)
        self.model_outputs = {id(t) for t in _tensors(traced.output)}
        self.model_inputs = {id(t) for t in _tensors(traced.inputs)}
        self.vocab_sizes = {
            node.module: self.modules[node.module].num_embeddings
            for node in traced.graph
            if node.is_module
            and isinstance(self.modules[node.module], nn.Embedding)
            and self.is_model_input(node.inputs[0])
        }
        """Embeddings indexed by the model's own input (tokens, not positions) -> vocabulary size."""

    def is_model_input(self, tensor: torch.Tensor) -> bool:
        """A model input, or a reshape of one (GPT-2's `input_ids.view(-1, T)`)."""
        while id(tensor) not in self.model_inputs:
            node = self.producer.get(id(tensor))
            if node is None or node.is_module or node.target not in _RESHAPES or len(node.inputs) != 1:
                return False
            tensor = node.inputs[0]
        return True

    def add_module_sites(self, layer_tp: LayerTP, search: _SplitSearch) -> None:
        """Sites that are whole modules: vocab-split embeddings and output heads, and the norms
        and dropouts outside split regions on (batch, sequence, ...) tensors (sequence parallel)."""
        for node in search.nodes:
            module = self.modules[node.module] if node.is_module else None
            if node.module in self.vocab_sizes:
                layer_tp.sites[node.module] = TPSite(style="vocab_embedding")
                layer_tp.divisors[f"{node.module} vocab"] = self.vocab_sizes[node.module]
            elif (
                is_linear(module)
                and out_features(module) in self.vocab_sizes.values()
                and node.module not in layer_tp.sites
                and self.feeds_output(node)
            ):
                layer_tp.sites[node.module] = TPSite(style="vocab_output")
                layer_tp.divisors[f"{node.module} vocab"] = out_features(module)
                layer_tp.colwise_groups.append([node.module])
            elif (
                module is not None
                and node.module not in layer_tp.sites
                and node.module not in search.inside
                and node.inputs
                and node.inputs[0].dim() >= 3
                and _is_position_wise(module, node)
            ):
                layer_tp.sites[node.module] = TPSite(style="sequence_parallel")

    def feeds_output(self, node: OpNode) -> bool:
        """Whether the node's output reaches a model output without passing another Linear or Embedding."""
        frontier, seen = list(node.outputs), set()
        while frontier:
            tensor = frontier.pop()
            if id(tensor) in self.model_outputs:
                return True
            for user in self.consumers.get(id(tensor), []):
                user_module = self.modules[user.module] if user.is_module else None
                if id(user) not in seen and not (is_linear(user_module) or isinstance(user_module, nn.Embedding)):
                    seen.add(id(user))
                    frontier.extend(user.outputs)
        return False


class _SplitSearch:
    """Finds the colwise/rowwise regions of one layer by propagating a split dimension."""

    def __init__(
        self, nodes: list[OpNode], call: LayerCall, producer: dict[int, OpNode], modules: dict[str, nn.Module]
    ):
        self.nodes, self.call, self.producer, self.modules = nodes, call, producer, modules
        self.in_layer = {id(node) for node in nodes}
        self.inside: set[str] = set()
        """Leaf modules that run on split tensors (an attention dropout): no site of their own."""
        self.groups: dict[int, list[OpNode]] = {}
        for node in nodes:
            if node.is_module and is_linear(modules[node.module]):
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
                extra = [
                    node
                    for node in self._linear_ancestors(reject.needs)
                    if id(node) not in assigned and node not in seeds
                ]
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
            if is_linear(mod):
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
        if is_linear(mod) and d == x.dim() - 1:
            region.rowwise.append(node)
            return
        if isinstance(mod, _NORMS) and d < x.dim() - len(mod.normalized_shape):
            split[id(node.outputs[0])] = d  # a per-head norm (q/k norm) keeps heads split
        elif isinstance(mod, ELEMENTWISE_MODULES):
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
        dim_index = 1 if node.target == "unbind" else 2  # unbind(x, dim); chunk/split(x, n, dim)
        dim = node.kwargs.get("dim", node.args[dim_index] if len(node.args) > dim_index else 0) % x.dim()
        outputs = node.outputs
        if dim == d:
            source = self.producer.get(id(x))
            if source is None or id(source) not in seed_ids:
                raise _Reject("chunking a split dimension that is not a fused projection")
            region.fused_sizes[source.module] = [t.shape[d] for t in outputs]
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
            if node.target == "split" and type(size) is int:  # GPT-2's .split(self.split_size, dim=2)
                self._divide_attrs_equal_to(node.module, size, region)
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
        self._divide_attrs_equal_to(node.module, out.shape[d_out], region)

    def _divide_attrs_equal_to(self, path: str, size: int, region: _Region) -> None:
        for attr, value in vars(self.modules[path]).items():
            if type(value) is int and value == size:
                region.divide_attrs[_join(path, attr)] = value

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
            width = math.gcd(*(out_features(self.modules[node.module]) for node in region.colwise))
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
