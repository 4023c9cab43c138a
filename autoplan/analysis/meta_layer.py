"""One layer run forward and backward on meta tensors, for ONE sequence: what
`autoplan.analysis.profile` records per distinct layer. No memory and no compute is spent:
every number comes from the ops the layer dispatches, under

- `FlopCounterMode` for forward and backward FLOPs;
- `saved_tensors_hooks` for what autograd keeps, deduplicated by storage, without
  parameters and buffers (and without 0-dim RNG state);
- `_Accounting`, a TorchDispatchMode that tags storages as tensor-parallel "split": outputs
  of colwise Linears and everything computed from them, up to the rowwise Linears that
  end the region (the same rule runs backward, where a gradient crossing a colwise
  weight is the replicated input gradient). It also sums elementwise traffic.

Attention runs as the memory-efficient fused kernel GPUs use (saving q, k, v, the output
and the log-sum-exp, never the s x s scores): on meta tensors PyTorch would otherwise pick
its math fallback, which no real device runs for training.

Bytes are counted at float32 (4 bytes per floating element; integer and bool tensors at
their own size), per sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from autoplan.analysis.trace import TracedModel, _join, _tensors, as_exported
from autoplan.schema.plan import INPUT_STYLES, SEQUENCE_PARALLEL_STYLES
from autoplan.schema.profile import selective_save_ops


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _element_bytes(tensor: torch.Tensor) -> int:
    return 4 if tensor.is_floating_point() or tensor.is_complex() else tensor.element_size()


def _tensor_bytes(tensor: torch.Tensor, real_sizes: bool = False) -> int:
    """Bytes of `tensor` counted at float32 (or, with `real_sizes`, at its own element size)."""
    return tensor.numel() * (tensor.element_size() if real_sizes else _element_bytes(tensor))


def _storage_bytes(tensor: torch.Tensor, real_sizes: bool = False) -> int:
    if real_sizes:
        return tensor.untyped_storage().nbytes()
    return tensor.untyped_storage().nbytes() // tensor.element_size() * _element_bytes(tensor)


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The signature of F.scaled_dot_product_attention, to bind its arguments."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_reference)


ATTENTION_TILE = 128
"""Keys per tile of a fused attention kernel: FlashAttention-2 tiles queries and keys in blocks of
64-128 (Dao, "FlashAttention-2", 2023, section 3.3; 128 x 128 for head dims up to 128 on A100
and H100). With a causal mask it skips the tiles above the diagonal and runs the diagonal ones
whole: (n + 1) / (2 n) of the products for n = ceil(s / ATTENTION_TILE) tiles a side."""


def causal_tile_fraction(seq_len: int) -> float:
    """Share of a causal attention's score and value products a tiled fused kernel runs.

    >>> causal_tile_fraction(128), causal_tile_fraction(8192)   # 1 tile: all of it; 64 tiles a side
    (1.0, 0.5078125)
    """
    tiles = max(1, -(-seq_len // ATTENTION_TILE))
    return (tiles + 1) / (2 * tiles)


class _FusedAttention(TorchFunctionMode):
    """Runs F.scaled_dot_product_attention on meta tensors as the fused memory-efficient kernel,
    and counts its FLOPs: as torch.utils.flop_counter counts them (`fwd_flops`, `bwd_flops`: the
    whole s x s products, a causal mask or not) and the share of them a fused kernel runs
    (`run_fraction`: `causal_tile_fraction` under a causal mask, else all).

    An explicit mask counts as causal inside a module whose `is_causal` is True (Hugging Face's
    decoder attentions, which pass their causal mask explicitly while traced and `is_causal=True`
    to the kernel when run): `causal_modules` enters and leaves them.

    A boolean mask becomes the kernel's additive bias; grouped-query attention repeats k and v
    (the fused kernels read them in place, so this counts (heads - kv_heads) / heads of k and v
    more than a GPU keeps, far less than the s x s scores of the math fallback)."""

    def __init__(self):
        super().__init__()
        self.fwd_flops = self.bwd_flops = self.run_flops = 0.0
        self.causal_depth = 0
        """How many modules with `is_causal` True the current call is inside."""

    def causal_modules(self, module: nn.Module) -> list:
        """Hooks on `module`'s submodules whose `is_causal` is True (remove them after the run)."""

        def enter(*_) -> None:
            self.causal_depth += 1

        def leave(*_) -> None:
            self.causal_depth -= 1

        return [
            hook
            for sub in module.modules()
            if getattr(sub, "is_causal", None) is True
            for hook in (sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave))
        ]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = _SDPA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        query, key, value, mask = (call.arguments[name] for name in ("query", "key", "value", "attn_mask"))
        if not query.is_meta or query.dim() != 4:
            return func(*args, **kwargs)
        if call.arguments["enable_gqa"]:
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        self._count(query, key, value, call.arguments["is_causal"] and mask is None or self.causal_depth > 0)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
            mask = mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query,
            key,
            value,
            mask,
            True,
            call.arguments["dropout_p"],
            call.arguments["is_causal"],
            scale=call.arguments["scale"],
        )[0]

    def _count(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool) -> None:
        fwd = sdpa_flop_count(query.shape, key.shape, value.shape)
        out_shape = (*query.shape[:-1], value.shape[-1])
        bwd = sdpa_backward_flop_count(out_shape, query.shape, key.shape, value.shape)
        self.fwd_flops += fwd
        self.bwd_flops += bwd
        self.run_flops += (fwd + bwd) * (causal_tile_fraction(key.shape[2]) if causal else 1.0)

    @property
    def run_fraction(self) -> float:
        total = self.fwd_flops + self.bwd_flops
        return self.run_flops / total if total else 1.0


@dataclass(eq=False)
class _Accounting(TorchDispatchMode):
    """Tags tensor-parallel split storages, counts split FLOPs and elementwise traffic."""

    split: set[int]
    """Storage keys of split tensors (seeded with the split parameters)."""
    state: set[int]
    """Storage keys of the layer's parameters and buffers."""
    colwise_weights: set[int]
    roles: list[str | None] = field(default_factory=lambda: [None])
    backward: bool = False
    tp_flops: float = 0.0
    elementwise_bytes: float = 0.0
    ops: list[int] = field(default_factory=lambda: [0, 0])
    """Aten ops dispatched in forward and in backward, views included (each pays the dispatcher and
    autograd's bookkeeping), detach left out."""
    selective: set[int] = field(default_factory=set)
    """Storages written by the ops selective recomputation keeps."""
    keep: list = field(default_factory=list)
    """Every storage seen, kept alive so a storage key is never reused within the run (the
    storages, not the tensors: autograd still steals a gradient nothing else holds, as a real
    step does, instead of copying it)."""
    real_sizes: bool = False
    """Count elementwise traffic at each tensor's own element size, not at float32."""

    def __post_init__(self):
        super().__init__()
        self.selective_ops = selective_save_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not torch.ops.aten.detach.default:  # no kernel, and the meta run's parameters
            self.ops[self.backward] += 1  # take their gradients through more of them than a real step
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        self.keep += [t.untyped_storage() for t in outputs]
        in_split = any(_storage_key(t) in self.split for t in inputs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None and in_split:
            self.tp_flops += formula(*args, **kwargs, out_val=out)
        if func.is_view:
            return out  # a view shares its storage, and so its tag
        if self.backward:
            # the gradient of a colwise input is replicated once all-reduced: it crosses a colwise weight
            crosses_colwise = formula is not None and any(_storage_key(t) in self.colwise_weights for t in inputs)
            out_split = in_split and not crosses_colwise
        else:
            role = self.roles[-1]
            out_split = role == "colwise" or (role is None and in_split)
            if formula is None:  # parameters excluded: an embedding reads rows, not its table
                self.elementwise_bytes += sum(
                    _tensor_bytes(t, self.real_sizes) for t in (*inputs, *outputs) if _storage_key(t) not in self.state
                )
            if func in self.selective_ops:
                self.selective.update(_storage_key(t) for t in outputs)
        if out_split:
            self.split.update(_storage_key(t) for t in outputs)
        return out


def _layer_state(traced: TracedModel, layer: str) -> dict[str, torch.Tensor]:
    """The layer's meta parameters (requiring grad) and buffers; tied names stay tied."""
    module = traced.module.get_submodule(layer)
    fresh: dict[int, torch.Tensor] = {}
    state = {}
    named = [(name, True) for name, _ in module.named_parameters(remove_duplicate=False)]
    named += [(name, False) for name, _ in module.named_buffers(remove_duplicate=False)]
    for name, is_param in named:
        meta = traced.meta_state[_join(layer, name)]
        if id(meta) not in fresh:
            fresh[id(meta)] = meta.detach().requires_grad_(is_param and meta.is_floating_point())
        state[name] = fresh[id(meta)]
    return state


def _layer_inputs(traced: TracedModel, layer: str) -> tuple[tuple, dict]:
    call = traced.calls[layer]
    return tree_map_only(
        torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()), (call.args, call.kwargs)
    )


def _tp_roles(
    traced: TracedModel, layer: str, state: dict[str, torch.Tensor]
) -> tuple[set[int], set[int], dict[nn.Module, str]]:
    """Storage keys of the split parameters and of the colwise weights, and each split module's
    role: "colwise" (vocab output too: its outputs are split) or "rowwise" (vocab embedding too:
    its outputs are whole after the all-reduce)."""
    split_params: set[int] = set()
    colwise_weights: set[int] = set()
    roles: dict[nn.Module, str] = {}
    for path, site in traced.tp[layer].sites.items():
        if site.style in SEQUENCE_PARALLEL_STYLES or site.style in INPUT_STYLES:
            continue
        prefix = _join(path[len(layer) + 1 :] if layer else path, "")
        is_colwise = site.style in ("colwise", "vocab_output")
        split_names = [
            name
            for name in state
            if name.startswith(prefix) and "." not in name[len(prefix) :] and (is_colwise or name == prefix + "weight")
        ]  # a rowwise bias stays whole
        split_params.update(_storage_key(state[name]) for name in split_names)
        if is_colwise:
            colwise_weights.add(_storage_key(state[prefix + "weight"]))
        roles[traced.module.get_submodule(path)] = "colwise" if is_colwise else "rowwise"
    return split_params, colwise_weights, roles


def profile_layer(traced: TracedModel, layer: str, loss: Callable | None) -> dict[str, Any]:
    """Run one layer forward and backward on meta tensors; return LayerProfile's cost fields."""
    run = _run_layer(traced, layer, loss)
    accounting, fwd, bwd = run.accounting, run.forward_flops, run.backward_flops
    saved_bytes, tp_saved_bytes = _saved_bytes(run.saved, accounting, run.inputs)
    return dict(
        fwd_flops=fwd,
        bwd_flops=bwd,
        tp_flops_fraction=min(1.0, run.tp_flops / (fwd + bwd)) if fwd + bwd else 0.0,
        elementwise_bytes=accounting.elementwise_bytes,
        forward_ops=accounting.ops[0],
        backward_ops=accounting.ops[1],
        saved_bytes=saved_bytes,
        tp_saved_bytes=tp_saved_bytes,
        largest_node_saved_bytes=run.largest_node_saved_bytes,
        attention_fwd_flops=run.attention.fwd_flops,
        attention_bwd_flops=run.attention.bwd_flops,
        attention_run_fraction=run.attention.run_fraction,
        output_bytes=float(sum(_tensor_bytes(t) for t in _tensors(run.output))),
        **_allreduce_bytes(traced, layer),
        **_half_precision_ratios(traced, layer, loss, saved_bytes, accounting.elementwise_bytes),
    )


def _half_precision_ratios(
    traced: TracedModel, layer: str, loss: Callable | None, saved_bytes: dict[str, float], elementwise_bytes: float
) -> dict[str, Any]:
    """The layer run again in bfloat16, bytes counted at their real sizes, over the float32
    count: what a 16-bit compute dtype keeps and moves, tensors the layer upcasts (a loss's
    float32 logits, a norm's statistics) included. A float32 run cannot see them: `.float()`
    of a float32 tensor dispatches nothing. A layer that cannot run in bfloat16 on meta keeps
    the even half (no ratio recorded)."""
    try:
        run = _run_layer(traced, layer, loss, dtype=torch.bfloat16)
    except Exception:  # noqa: BLE001 - the float32 profile stands; only the 16-bit refinement is lost
        return {}
    half, _ = _saved_bytes(run.saved, run.accounting, run.inputs, real_sizes=True)
    return dict(
        half_saved_ratio={option: half[option] / full for option, full in saved_bytes.items() if full > 0},
        half_elementwise_ratio=run.accounting.elementwise_bytes / elementwise_bytes if elementwise_bytes else None,
    )


@dataclass
class _LayerRun:
    """What one forward + backward of a layer on meta tensors recorded."""

    accounting: _Accounting
    saved: list[torch.Tensor]
    inputs: Any
    output: Any
    forward_flops: float
    backward_flops: float
    tp_flops: float
    largest_node_saved_bytes: float
    attention: _FusedAttention


def _run_layer(traced: TracedModel, layer: str, loss: Callable | None, dtype: torch.dtype | None = None) -> _LayerRun:
    """One forward and backward of `layer` (and `loss` after the last one) on meta tensors,
    its floating state and inputs cast to `dtype` when given."""
    module = traced.module.get_submodule(layer)
    state = _layer_state(traced, layer)
    args, kwargs = _layer_inputs(traced, layer)
    split_params, colwise_weights, roles = _tp_roles(traced, layer, state)
    if dtype is not None:
        cast = {id(t): _cast(t, dtype) for t in state.values()}
        renamed = {_storage_key(t): _storage_key(cast[id(t)]) for t in state.values()}
        split_params = {renamed[key] for key in split_params}
        colwise_weights = {renamed[key] for key in colwise_weights}
        state = {name: cast[id(tensor)] for name, tensor in state.items()}
        args, kwargs = tree_map_only(torch.Tensor, lambda t: _cast(t, dtype), (args, kwargs))
    accounting = _Accounting(
        split=split_params,
        state={_storage_key(t) for t in state.values()},
        colwise_weights=colwise_weights,
        real_sizes=dtype is not None,
    )
    saved: list[torch.Tensor] = []

    def count_saved(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    def enter(site_module: nn.Module, args: tuple) -> None:
        accounting.roles.append(roles[site_module])

    def leave(site_module: nn.Module, args: tuple, output: Any) -> None:
        accounting.roles.pop()

    handles = []
    for site_module in roles:
        handles += [site_module.register_forward_pre_hook(enter), site_module.register_forward_hook(leave)]
    attention = _FusedAttention()
    handles += attention.causal_modules(module)
    try:
        with (
            FlopCounterMode(display=False) as forward_flops,
            attention,
            accounting,
            as_exported(),
            torch.autograd.graph.saved_tensors_hooks(count_saved, lambda t: t),
        ):
            output = torch.func.functional_call(module, state, args, kwargs)
            final = loss(output) if loss is not None else output
    finally:
        for handle in handles:
            handle.remove()
    tp_forward = accounting.tp_flops
    accounting.tp_flops, accounting.backward = 0.0, True
    roots = [t for t in _tensors(final) if t.requires_grad]
    largest_node_saved = _largest_node_saved_bytes(roots, accounting.state)
    with FlopCounterMode(display=False) as backward_flops, accounting:
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    return _LayerRun(
        accounting=accounting,
        saved=saved,
        inputs=(args, kwargs),
        output=output,
        forward_flops=float(forward_flops.get_total_flops()),
        backward_flops=float(backward_flops.get_total_flops()),
        tp_flops=tp_forward + accounting.tp_flops,
        largest_node_saved_bytes=largest_node_saved,
        attention=attention,
    )


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor as a fresh leaf of `dtype` (requiring grad as before); others unchanged."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.detach().to(dtype).requires_grad_(tensor.requires_grad)


def _largest_node_saved_bytes(roots: list[torch.Tensor], state: set[int]) -> float:
    """The most saved activation bytes one backward node of the graph under `roots` reads
    (its saved tensors' storages, parameters and 0-d tensors left out as in `_saved_bytes`)."""
    largest, seen, stack = 0, set(), [t.grad_fn for t in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        storages: dict[int, int] = {}
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            value = getattr(node, name)
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and _storage_key(tensor) not in state:
                    storages[_storage_key(tensor)] = _storage_bytes(tensor)
        largest = max(largest, sum(storages.values()))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return float(largest)


def _saved_bytes(
    saved: list[torch.Tensor], accounting: _Accounting, inputs: Any, real_sizes: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes kept for backward per recompute option, and the tp-split part of each.

    none: every storage autograd saved; selective: the layer input plus saved outputs of
    `selective_save_ops()`; full: the layer input (what non-reentrant checkpointing keeps)."""
    kept = {
        _storage_key(t): _storage_bytes(t, real_sizes)
        for t in saved
        if t.dim() > 0 and _storage_key(t) not in accounting.state
    }
    given = {_storage_key(t): _storage_bytes(t, real_sizes) for t in _tensors(inputs)}
    chosen = {
        "none": kept,
        "selective": {**given, **{k: b for k, b in kept.items() if k in accounting.selective}},
        "full": given,
    }
    return (
        {option: float(sum(kept_bytes.values())) for option, kept_bytes in chosen.items()},
        {
            option: float(sum(b for k, b in kept_bytes.items() if k in accounting.split))
            for option, kept_bytes in chosen.items()
        },
    )


def _allreduce_bytes(traced: TracedModel, layer: str) -> dict[str, float]:
    """Forward: one all-reduce of the output per rowwise Linear and vocab-split embedding, and
    the all-gather of the vocab-split logits (the backend gathers them for the loss), counted
    as the all-reduce of half as many bytes, which costs the same on a ring. Backward: one
    all-reduce of the input gradient per group of colwise Linears reading one tensor."""
    calls = {node.module: node for node in traced.graph if node.layer == layer and node.is_module}
    reduced_share = {"rowwise": 1.0, "vocab_embedding": 1.0, "vocab_output": 0.5}
    forward = sum(
        reduced_share[site.style] * _tensor_bytes(calls[path].outputs[0])
        for path, site in traced.tp[layer].sites.items()
        if site.style in reduced_share
    )
    backward = sum(_tensor_bytes(calls[group[0]].inputs[0]) for group in traced.tp[layer].colwise_groups)
    return dict(tp_allreduce_bytes_fwd=float(forward), tp_allreduce_bytes_bwd=float(backward))
