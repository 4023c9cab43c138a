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
`TracedModel.fx_graph()` gives the same graph as a `torch.fx.Graph` over the model.

Why not torch.export: it gives the same information (ops owned by modules) but costs
seconds per block on a huge model, and it erases the Python-level calls this module
reads: `view(B, T, self.num_heads, head_dim)` (head counts and the attributes behind
them) and `chunk(3)` of a fused projection.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry

from autoplan.analysis.graph import LayerCall, LayerTP, OpNode, TracedModel, _join, _tensors
from autoplan.analysis.sp_structure import add_colwise_input_sites, apply_sequence_parallel
from autoplan.analysis.tp_structure import ELEMENTWISE_MODULES, find_tensor_parallel
from autoplan.errors import TraceError

__all__ = ["LayerCall", "LayerTP", "OpNode", "TracedModel", "as_exported", "trace_model", "without_kv_cache"]

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_SHAPE_ONLY = frozenset(
    {
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "rand_like",
        "randn_like",
        "randint_like",
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
        "size",
        "dim",
    }
)
"""Torch calls whose tensor output depends only on their inputs' shapes (no dataflow)."""


def as_exported():
    """Run model code as `torch.export` in non-strict mode runs it: `torch.compiler.is_compiling()`
    and `is_exporting()` are True, so libraries take their traceable paths (Hugging Face then
    skips the data-dependent mask checks, `if (mask == 0).all()`, that meta tensors cannot answer).

        >>> with as_exported():
        ...     torch.compiler.is_exporting()
        True
    """
    from torch._export.utils import _compiling_state_context

    return _compiling_state_context()


@contextmanager
def without_kv_cache(module: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model (its `config.use_cache` True, the default of decoders) without
    its key/value cache: training does not use one, and a cache object a layer is called with
    would keep the keys of every earlier call (a layer profiled after the trace would attend
    over twice the sequence)."""
    config = getattr(module, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def trace_model(module: nn.Module, example_inputs: tuple) -> TracedModel:
    """Trace `module` on meta tensors: layers, dataflow graph, repeated blocks, tensor-parallel sites.

    `example_inputs` may live on any device (they are replaced by meta tensors of the same
    shape); a model that cannot run on meta tensors raises ValueError naming the module and
    the operation.

        >>> traced = trace_model(model, (tokens,))        # doctest: +SKIP
        >>> traced.layers, traced.tp_sites, traced.tp_divisors  # doctest: +SKIP
    """
    inputs = tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
    meta_state = _meta_state(module)
    paths = {mod: path for path, mod in module.named_modules()}
    recorder = _Recorder(paths, set(_layer_candidates(module)))
    glue = _GlueFlops(recorder)
    with without_kv_cache(module), recorder.hooked(module), recorder, glue, torch.no_grad(), as_exported():
        output = recorder.run(module, meta_state, inputs)
    layers = recorder.layer_order
    signatures = {
        layer: _signature(module.get_submodule(layer), layer, recorder.nodes_of(layer), recorder.calls[layer])
        for layer in layers
        if layer not in recorder.replayed
    }
    signatures.update({layer: signatures[twin] for layer, twin in recorder.replayed.items()})
    signatures = {layer: signatures[layer] for layer in layers}
    traced = TracedModel(
        module,
        layers,
        signatures,
        recorder.nodes,
        recorder.calls,
        {},
        _tied_parameters(module),
        meta_state,
        inputs,
        output,
        num_calls={layer: recorder.num_calls.get(layer, 1) for layer in layers},
        glue_flops=glue.flops,
        module_calls=recorder.module_calls,
        layer_reads={layer: set(recorder.layer_reads.get(layer, ())) for layer in layers},
        layer_derives={layer: set(recorder.layer_derives.get(layer, ())) for layer in layers},
        output_reads=set(recorder.sources_of(output)),
    )
    flow = find_tensor_parallel(traced)
    add_colwise_input_sites(traced, flow)
    apply_sequence_parallel(traced, flow)
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
    with a container anywhere below it: Hugging Face's `model.model`, OPT's `model.decoder`,
    BERT's `bert.encoder`, T5's `encoder`); everything else is one layer."""

    def holds_container(module: nn.Module) -> bool:
        return any(isinstance(child, _CONTAINERS) or holds_container(child) for child in module.children())

    def expand(module: nn.Module, path: str, is_item: bool) -> list[str]:
        children = list(module.named_children())
        is_container = isinstance(module, _CONTAINERS)
        is_trunk = not is_item and holds_container(module)
        if children and (path == "" or is_container or is_trunk):
            return [layer for name, child in children for layer in expand(child, _join(path, name), is_container)]
        return [path]

    return expand(root, "", False)


_TRACE_ADVICE = (
    "make that code traceable as torch.export requires (no data-dependent Python branches "
    "such as `if tensor.any()`; guard them with `torch.compiler.is_compiling()`)"
)


class _GlueFlops(TorchDispatchMode):
    """FLOPs (torch.utils.flop_counter's formulas) of ops run outside every layer, by module path."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder
        self.flops: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None and self.recorder.current_layer is None and not self.recorder.in_hook:
            where = self.recorder.stack[-1][0] if self.recorder.stack else ""
            self.flops[where] = self.flops.get(where, 0.0) + formula(*args, **kwargs, out_val=out)
        return out


class _TraceError(Exception):
    def __init__(self, module: str, op: str, cause: BaseException):
        super().__init__(module, op, cause)
        self.module, self.op, self.cause = module, op, cause


class _Recorder(TorchFunctionMode):
    """Records torch calls (outside leaf modules) and leaf-module calls into OpNodes."""

    def __init__(self, paths: dict[nn.Module, str], candidates: set[str]):
        super().__init__()
        self.paths, self.candidates = paths, candidates
        # Leaves are recorded as one node: modules with parameters of their own (Linear, norms) and
        # the known elementwise ones; the ops of any other parameter-free leaf (Hugging Face's
        # activation classes) are recorded one by one, so tensor parallelism sees through them.
        self.leaves = {
            module
            for module in paths
            if next(module.children(), None) is None
            and (next(module.parameters(recurse=False), None) is not None or isinstance(module, ELEMENTWISE_MODULES))
        }
        self.module_calls: dict[str, tuple[tuple, dict]] = {}
        """Module path -> (args, kwargs) of its first call."""
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
        self.num_calls: dict[str, int] = {}
        """Layer -> how many times forward called it (a shared embedding or dropout runs twice)."""
        self.sources: dict[int, frozenset[str]] = {}
        """id(tensor) -> the layers whose outputs its value depends on, through the code between
        layers (shape reads carry nothing); the tensors stay alive in `nodes` and `calls`."""
        self.alive: list[Any] = []
        self.layer_reads: dict[str, set[str]] = {}
        """Layer -> the layers whose outputs the values it is called with depend on."""
        self.replaying: str | None = None
        """The layer whose call `replay` is answering with fresh tensors."""
        self.layer_derives: dict[str, set[str]] = {}
        """Layer -> the layers whose outputs its own output depends on (a repeat that replayed
        its twin: all it reads)."""

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
            self.nodes.append(
                OpNode(
                    name, self.stack[-1][0] if self.stack else "", self.current_layer, args, kwargs, output, False, func
                )
            )
        if name not in _SHAPE_ONLY:  # dataflow
            sources = self.sources_of((args, kwargs))
            if sources:
                self.mark(output, sources | self.sources_of(output))
                if name == "__setitem__":  # x[i] = y: x now depends on y
                    self.mark(args[0], sources)
        return output

    def sources_of(self, value: Any) -> frozenset[str]:
        return frozenset(source for tensor in _tensors(value) for source in self.sources.get(id(tensor), ()))

    def mark(self, value: Any, sources: frozenset[str]) -> None:
        for tensor in _tensors(value):
            self.sources[id(tensor)] = sources
            self.alive.append(tensor)

    def run(self, module: nn.Module, state: dict[str, torch.Tensor], inputs: tuple) -> Any:
        try:
            return torch.func.functional_call(module, state, inputs, tie_weights=True)
        except _TraceError as error:
            where = error.module or "<root>"
            raise TraceError(
                f"cannot trace {type(module).__name__}: module {where!r} "
                f"({type(module.get_submodule(error.module)).__name__}) failed in operation "
                f"{error.op!r} on meta tensors: {error.cause}; {_TRACE_ADVICE}"
            ) from None
        except Exception as error:
            where = self.stack[-1][0] if self.stack else "<root>"
            raise TraceError(
                f"cannot trace {type(module).__name__}: module {where!r} failed outside a torch "
                f"operation on meta tensors: {type(error).__name__}: {error}; {_TRACE_ADVICE}"
            ) from None

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
        if self.paths[layer] not in self.calls:  # a layer's own second call (T5's dropout) replays itself
            self.replayed[self.paths[layer]] = twin
        self.replaying = self.paths[layer]
        self.in_hook = True  # the tensors made here are not part of the graph
        try:
            return tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), output)
        finally:
            self.in_hook = False

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        path = self.paths[module]
        self.stack.append((path, args, kwargs))
        self.module_calls.setdefault(path, (args, kwargs))
        if self.current_layer is None and path in self.candidates:
            self.current_layer = path
            self.layer_reads.setdefault(path, set()).update(self.sources_of((args, kwargs)))
            self.num_calls[path] = self.num_calls.get(path, 0) + 1
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
            replayed, self.replaying = self.replaying == path, None
            derives = self.layer_reads[path] if replayed else self.sources_of(output)
            self.layer_derives.setdefault(path, set()).update(derives)
            self.mark(output, frozenset({path}))
            self.in_hook = True
            self.outputs_by_key.setdefault((self.static_keys[module], _describe_inputs(args, kwargs)), (path, output))
            self.in_hook = False
            self.current_layer = None

    def nodes_of(self, layer: str) -> list[OpNode]:
        return [node for node in self.nodes if node.layer == layer]


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)}:{tensor.dtype}"


def _describe_inputs(args: tuple, kwargs: dict) -> tuple:
    return tuple(
        _describe(leaf) if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in tree_leaves((args, kwargs))
    )


def _static_key(layer: nn.Module) -> tuple:
    """What decides a layer's computation besides its inputs: class, state shapes and the
    plain attributes of every submodule (a layer_idx or attention type makes twins differ)."""
    state = tuple((name, _describe(t)) for name, t in (*layer.named_parameters(), *layer.named_buffers()))
    attributes = tuple(
        (path, type(sub).__qualname__, name, value)
        for path, sub in layer.named_modules()
        for name, value in vars(sub).items()
        if not name.startswith("_") and name != "training" and isinstance(value, (int, float, str, bool, type(None)))
    )
    return type(layer), state, attributes


def _signature(module: nn.Module, layer: str, nodes: list[OpNode], call: LayerCall) -> str:
    """Hash of the layer's class, state shapes, input shapes and op sequence (module paths relative)."""
    parts = [type(module).__qualname__]
    parts += [f"{name}={_describe(t)}" for name, t in (*module.named_parameters(), *module.named_buffers())]
    parts += [_describe(t) for t in _tensors((call.args, call.kwargs))]
    for node in nodes:
        relative = node.module[len(layer) :] if layer else node.module
        parts.append(f"{node.target}@{relative}->" + ",".join(_describe(t) for t in node.outputs))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
