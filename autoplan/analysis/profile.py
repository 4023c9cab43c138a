"""Profile a model layer by layer for ONE sequence: FLOPs, saved activations, tp collectives.

    >>> from autoplan import zoo
    >>> job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    >>> profile = profile_model(job.module, job.example_inputs, model_name="gpt-tiny")
    >>> profile.global_batch_size, profile.seq_len, profile.layers[3].name
    (4, 32, 'blocks.0')
    >>> profile.layers[3].saved_bytes["full"]       # the block input: 32 tokens * 64 * 4 bytes
    8192.0

Every example input is cut to its first sequence (dim 0 -> 1) and traced on meta tensors
(`autoplan.analysis.trace`); each distinct layer (one per signature: the 96 GPT-3 blocks cost one)
then runs forward and backward on meta tensors under

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

`measure_layer` runs one layer on a real device instead (random weights, inputs of the
traced shapes): median forward and backward seconds and the bytes autograd kept.
`autoplan.measure.profile_store` calls it once per distinct layer and micro-batch size.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from autoplan.errors import TraceError
from autoplan.schema.profile import LayerProfile, ModelProfile, selective_save_ops
from autoplan.schema.plan import INPUT_STYLES, SEQUENCE_PARALLEL_STYLES
from autoplan.analysis.stage_cuts import stage_start_blockers
from autoplan.analysis.trace import TracedModel, _join, _tensors, as_exported, trace_model

def profile_model(module: nn.Module, example_inputs: tuple, model_name: str = "model",
                  loss_fn: Callable | None = None, *, targets: torch.Tensor | None = None,
                  measure: bool = False, device: str | torch.device | None = None) -> ModelProfile:
    """Per-layer costs of one sequence of `example_inputs` (one global batch; dim 0 is the batch).

    `loss_fn(output, targets)` is profiled as part of the last layer (with `targets` cut to
    one sequence; without targets it is called with None, and a loss that needs targets is
    left out). `measure=True` also times each distinct layer's forward and backward for one
    sequence on `device` (default: CUDA when available, else CPU; see `measure_layer`).

        >>> profile = profile_model(model, (tokens,), model_name="gpt2-small")   # doctest: +SKIP
        >>> [(layer.name, layer.fwd_flops) for layer in profile.layers]         # doctest: +SKIP
    """
    first = example_inputs[0] if example_inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("example_inputs[0] must be a tensor whose dim 0 is the batch; "
                         f"got {type(first).__name__}{'' if first is None else ' of shape ' + str(tuple(getattr(first, 'shape', ())))}")
    one_sequence = tuple(_first_sequence(x) for x in example_inputs)
    traced = trace_model(module, one_sequence)
    loss = bind_loss(loss_fn, _first_sequence(targets), torch.device("meta"))
    measure_device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")

    costs: dict[tuple[str, bool], dict[str, Any]] = {}
    counted: set[int] = set()
    layers = []
    for layer in traced.layers:
        with_loss = loss is not None and layer == traced.layers[-1]
        key = (traced.representative(layer), with_loss)  # the loss rides on the last layer only
        if key not in costs:
            try:
                costs[key] = _profile_layer(traced, key[0], loss if with_loss else None)
            except Exception as error:
                raise ValueError(f"cannot profile layer {key[0]!r} ({type(module.get_submodule(key[0])).__name__}) "
                                 f"forward and backward on meta tensors: {type(error).__name__}: {error}") from error
            if measure:
                measured_loss = bind_loss(loss_fn, _first_sequence(targets), measure_device) if with_loss else None
                measured = measure_layer(traced, key[0], measure_device, loss=measured_loss)
                costs[key].update(measured_fwd_s=measured.forward_s, measured_bwd_s=measured.backward_s,
                                  measured_device=device_name(measure_device))
        param_count, tp_param_count, param_tensors = _count_parameters(traced, layer, counted)
        layer_tp = traced.tp[layer]
        layers.append(LayerProfile(name=layer, signature=traced.signatures[layer], param_count=param_count,
                                   tp_param_count=tp_param_count, param_tensors=param_tensors, tp_sites=layer_tp.sites,
                                   tp_divisors=layer_tp.divisors, tp_divide_attrs=layer_tp.divide_attrs,
                                   **_repeated(costs[key], traced.num_calls[layer])))
    _charge_unowned_parameters(traced, layers, counted)
    check_conservation(traced, layers)

    inputs_bytes = sum(_tensor_bytes(t) for t in _tensors(one_sequence))
    is_tokens = first.dim() == 2 and not first.is_floating_point() and not first.is_complex()
    return ModelProfile(
        model_name=model_name, layers=layers, global_batch_size=int(first.shape[0]),
        seq_len=int(first.shape[1]) if is_tokens else 1, input_bytes=float(inputs_bytes),
        tied_parameters=traced.tied_parameters, fingerprint=_fingerprint(module, traced),
        num_params=sum(p.numel() for p in module.parameters()),
        model_flops_per_sequence=sum(layer.fwd_flops + layer.bwd_flops for layer in layers),
        sequence_parallel_blocker=traced.sequence_parallel_blocker,
        stage_start_blockers=stage_start_blockers(traced))


def _repeated(cost: dict[str, Any], num_calls: int) -> dict[str, Any]:
    """A layer's costs when forward calls it `num_calls` times (T5's shared embedding): every
    call computes and keeps its own activations; the output crossing a cut is the last call's."""
    if num_calls == 1:
        return cost
    scaled = dict(cost)
    for name in ("fwd_flops", "bwd_flops", "elementwise_bytes", "tp_allreduce_bytes_fwd", "tp_allreduce_bytes_bwd"):
        scaled[name] = cost[name] * num_calls
    for name in ("saved_bytes", "tp_saved_bytes"):
        scaled[name] = {option: value * num_calls for option, value in cost[name].items()}
    return scaled


def _charge_unowned_parameters(traced: TracedModel, layers: list[LayerProfile], counted: set[int]) -> None:
    """Parameters outside every layer (a position embedding or class token the root's own
    forward adds) are charged to the first layer: replicated, never tensor-parallel split."""
    unowned = [param for param in traced.module.parameters() if id(param) not in counted]
    if unowned and layers:
        layers[0].param_count += sum(param.numel() for param in unowned)
        layers[0].param_tensors += len(unowned)
        counted.update(id(param) for param in unowned)


GLUE_FLOPS_TOLERANCE = 0.01
"""Share of the model's forward FLOPs that may run outside every layer before a trace is refused."""


def check_conservation(traced: TracedModel, layers: list[LayerProfile]) -> None:
    """The layers account for every parameter and (within GLUE_FLOPS_TOLERANCE) every FLOP of
    the model's forward: a TraceError names what is missing, rather than a plan that silently
    leaves part of the model out.

        >>> check_conservation(traced, profile.layers)     # doctest: +SKIP
    """
    model = type(traced.module).__name__
    expected = sum(param.numel() for param in traced.module.parameters())
    counted = sum(layer.param_count for layer in layers)
    if counted != expected:
        raise TraceError(f"profile of {model} holds {counted:,} parameters but the model has {expected:,}: "
                         f"layers {[layer.name for layer in layers]} do not cover it")
    glue = sum(traced.glue_flops.values())
    layer_flops = sum(layer.fwd_flops for layer in layers)
    if glue > GLUE_FLOPS_TOLERANCE * (glue + layer_flops):
        where = ", ".join(f"{path or '<root>'} {flops:.3g}" for path, flops in traced.glue_flops.items() if flops)
        raise TraceError(f"{model}: {glue / (glue + layer_flops):.1%} of the forward FLOPs run outside every layer "
                         f"(> {GLUE_FLOPS_TOLERANCE:.0%}; by module: {where}): move that computation into a "
                         f"submodule so a layer owns it")


def _first_sequence(value: Any) -> Any:
    return value[:1] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value


def bind_loss(loss_fn: Callable | None, targets: torch.Tensor | None, device: torch.device) -> Callable | None:
    """`loss_fn` with `targets` (already cut to the batch) made on `device`: `loss(output)`.

    Meta targets become zeros (valid class ids) or random values on a real device. Without
    targets the loss is called with None, and a loss that needs them returns the output
    unchanged (the layer is timed without it)."""
    if loss_fn is None:
        return None
    bound_targets = None if targets is None else _materialize(targets, device)

    def loss(output: Any) -> Any:
        try:
            return loss_fn(output, bound_targets)
        except Exception:  # a loss that needs the targets we were not given: go on without it
            if bound_targets is None:
                return output
            raise
    return loss


def _fingerprint(module: nn.Module, traced: TracedModel) -> str:
    text = [traced.signatures[layer] for layer in traced.layers]
    text += [f"{name}:{tuple(p.shape)}" for name, p in module.named_parameters(remove_duplicate=False)]
    return hashlib.sha256("\n".join(text).encode()).hexdigest()[:16]


def _count_parameters(traced: TracedModel, layer: str, counted: set[int]) -> tuple[int, int, int]:
    """Elements of the layer's parameters not counted by an earlier layer, of those the
    tp-split ones (colwise and vocab weights and biases, rowwise weights: a rowwise bias is
    added after the all-reduce, so it stays whole), and the number of those tensors."""
    module = traced.module.get_submodule(layer)
    split = set()
    for path, site in traced.tp[layer].sites.items():
        site_module = traced.module.get_submodule(path)
        if site.style in ("colwise", "vocab_output"):
            split.update(id(p) for p in site_module.parameters())
        elif site.style in ("rowwise", "vocab_embedding"):
            split.add(id(site_module.weight))
    total = tp = tensors = 0
    for param in module.parameters():
        if id(param) not in counted:
            counted.add(id(param))
            total += param.numel()
            tp += param.numel() if id(param) in split else 0
            tensors += 1
    return total, tp, tensors


# --- one layer on meta tensors -------------------------------------------------------------

def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _element_bytes(tensor: torch.Tensor) -> int:
    return 4 if tensor.is_floating_point() or tensor.is_complex() else tensor.element_size()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * _element_bytes(tensor)


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes() // tensor.element_size() * _element_bytes(tensor)


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """The signature of F.scaled_dot_product_attention, to bind its arguments."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_reference)


class _FusedAttention(TorchFunctionMode):
    """Runs F.scaled_dot_product_attention on meta tensors as the fused memory-efficient kernel.

    A boolean mask becomes the kernel's additive bias; grouped-query attention repeats k and v
    (the fused kernels read them in place, so this counts (heads - kv_heads) / heads of k and v
    more than a GPU keeps, far less than the s x s scores of the math fallback)."""

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
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
            mask = mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, True, call.arguments["dropout_p"], call.arguments["is_causal"],
            scale=call.arguments["scale"])[0]


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
    selective: set[int] = field(default_factory=set)
    """Storages written by the ops selective recomputation keeps."""
    keep: list = field(default_factory=list)
    """Every tensor seen, kept alive so a storage key is never reused within the run."""

    def __post_init__(self):
        super().__init__()
        self.selective_ops = selective_save_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        self.keep.append(outputs)
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
                self.elementwise_bytes += sum(_tensor_bytes(t) for t in (*inputs, *outputs)
                                              if _storage_key(t) not in self.state)
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
    return tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()),
                         (call.args, call.kwargs))


def _tp_roles(traced: TracedModel, layer: str, state: dict[str, torch.Tensor]
              ) -> tuple[set[int], set[int], dict[nn.Module, str]]:
    """Storage keys of the split parameters and of the colwise weights, and each split module's
    role: "colwise" (vocab output too: its outputs are split) or "rowwise" (vocab embedding too:
    its outputs are whole after the all-reduce)."""
    split_params, colwise_weights, roles = set(), set(), {}
    for path, site in traced.tp[layer].sites.items():
        if site.style in SEQUENCE_PARALLEL_STYLES or site.style in INPUT_STYLES:
            continue
        prefix = _join(path[len(layer) + 1:] if layer else path, "")
        is_colwise = site.style in ("colwise", "vocab_output")
        split_names = [name for name in state if name.startswith(prefix) and "." not in name[len(prefix):]
                       and (is_colwise or name == prefix + "weight")]   # a rowwise bias stays whole
        split_params.update(_storage_key(state[name]) for name in split_names)
        if is_colwise:
            colwise_weights.add(_storage_key(state[prefix + "weight"]))
        roles[traced.module.get_submodule(path)] = "colwise" if is_colwise else "rowwise"
    return split_params, colwise_weights, roles


def _profile_layer(traced: TracedModel, layer: str, loss: Callable | None) -> dict[str, Any]:
    """Run one layer forward and backward on meta tensors; return LayerProfile's cost fields."""
    module = traced.module.get_submodule(layer)
    state = _layer_state(traced, layer)
    args, kwargs = _layer_inputs(traced, layer)
    split_params, colwise_weights, roles = _tp_roles(traced, layer, state)
    accounting = _Accounting(split=split_params, state={_storage_key(t) for t in state.values()},
                             colwise_weights=colwise_weights)
    saved: list[torch.Tensor] = []

    def enter(site_module: nn.Module, args: tuple) -> None:
        accounting.roles.append(roles[site_module])

    def leave(site_module: nn.Module, args: tuple, output: Any) -> None:
        accounting.roles.pop()

    handles = []
    for site_module in roles:
        handles += [site_module.register_forward_pre_hook(enter), site_module.register_forward_hook(leave)]
    try:
        with FlopCounterMode(display=False) as forward_flops, _FusedAttention(), accounting, as_exported(), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            output = torch.func.functional_call(module, state, args, kwargs)
            final = loss(output) if loss is not None else output
    finally:
        for handle in handles:
            handle.remove()
    tp_forward = accounting.tp_flops
    accounting.tp_flops, accounting.backward = 0.0, True
    roots = [t for t in _tensors(final) if t.requires_grad]
    with FlopCounterMode(display=False) as backward_flops, accounting:
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])

    fwd, bwd = float(forward_flops.get_total_flops()), float(backward_flops.get_total_flops())
    saved_bytes, tp_saved_bytes = _saved_bytes(saved, accounting, (args, kwargs))
    return dict(
        fwd_flops=fwd, bwd_flops=bwd,
        tp_flops_fraction=min(1.0, (tp_forward + accounting.tp_flops) / (fwd + bwd)) if fwd + bwd else 0.0,
        elementwise_bytes=accounting.elementwise_bytes, saved_bytes=saved_bytes, tp_saved_bytes=tp_saved_bytes,
        output_bytes=float(sum(_tensor_bytes(t) for t in _tensors(output))),
        **_allreduce_bytes(traced, layer))


def _saved_bytes(saved: list[torch.Tensor], accounting: _Accounting, inputs: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes kept for backward per recompute option, and the tp-split part of each.

    none: every storage autograd saved; selective: the layer input plus saved outputs of
    `selective_save_ops()`; full: the layer input (what non-reentrant checkpointing keeps)."""
    kept = {_storage_key(t): _storage_bytes(t) for t in saved if t.dim() > 0 and _storage_key(t) not in accounting.state}
    given = {_storage_key(t): _storage_bytes(t) for t in _tensors(inputs)}
    chosen = {"none": kept,
              "selective": {**given, **{k: b for k, b in kept.items() if k in accounting.selective}},
              "full": given}
    return ({option: float(sum(kept_bytes.values())) for option, kept_bytes in chosen.items()},
            {option: float(sum(b for k, b in kept_bytes.items() if k in accounting.split))
             for option, kept_bytes in chosen.items()})


def _allreduce_bytes(traced: TracedModel, layer: str) -> dict[str, float]:
    """Forward: one all-reduce of the output per rowwise Linear and vocab-split embedding, and
    the all-gather of the vocab-split logits (the backend gathers them for the loss), counted
    as the all-reduce of half as many bytes, which costs the same on a ring. Backward: one
    all-reduce of the input gradient per group of colwise Linears reading one tensor."""
    calls = {node.module: node for node in traced.graph if node.layer == layer and node.is_module}
    reduced_share = {"rowwise": 1.0, "vocab_embedding": 1.0, "vocab_output": 0.5}
    forward = sum(reduced_share[site.style] * _tensor_bytes(calls[path].outputs[0])
                  for path, site in traced.tp[layer].sites.items() if site.style in reduced_share)
    backward = sum(_tensor_bytes(calls[group[0]].inputs[0]) for group in traced.tp[layer].colwise_groups)
    return dict(tp_allreduce_bytes_fwd=float(forward), tp_allreduce_bytes_bwd=float(backward))


# --- measurement on a real device -------------------------------------------------------------

@dataclass(frozen=True)
class LayerMeasurement:
    """One layer run forward and backward on a real device, for one batch of inputs."""

    forward_s: float
    """Median forward seconds (the loss included when one was given)."""
    backward_s: float
    """Median backward seconds."""
    saved_bytes: float
    """Bytes autograd kept for backward: unique storages without the layer's parameters and
    buffers, at the dtype the layer ran in (what recompute "none" keeps)."""


def device_name(device: torch.device) -> str:
    """What a measurement on `device` is labelled with: the GPU's name, or "cpu".

    >>> device_name(torch.device("cpu"))
    'cpu'
    """
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _materialize(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A real tensor shaped like `t`: random floats (in `dtype` when given), zeros for integers."""
    if t.is_floating_point():
        return torch.randn(t.shape, dtype=dtype or t.dtype, device=device).requires_grad_(t.requires_grad)
    return torch.zeros(t.shape, dtype=t.dtype, device=device)


def measure_layer(traced: TracedModel, layer: str, device: torch.device, *, dtype: torch.dtype | None = None,
                  loss: Callable | None = None, repeats: int = 3, min_time_s: float = 0.0) -> LayerMeasurement:
    """Run `layer` of `traced` forward and backward on `device` with random weights and inputs
    of the traced shapes (integer inputs are zeros: valid token ids); floating tensors in `dtype`
    (default: as traced). `loss(output)`, when given, runs after the forward and is timed with it.

    The first round warms up and counts what autograd saves (`saved_tensors_hooks`); the
    times are the medians of `repeats` more rounds. With `min_time_s` the rounds go on until
    they add up to that long and the times are their means: on cores shared with other
    processes a short round gets a whole core or half of one as the scheduler's slices fall,
    and only the average over many slices is the rate a rank sees.

        >>> traced = trace_model(module, (tokens[:2],))                       # doctest: +SKIP
        >>> measure_layer(traced, "blocks.0", torch.device("cpu")).forward_s  # doctest: +SKIP
        0.0012
    """
    module = traced.module.get_submodule(layer)
    made: dict[int, torch.Tensor] = {}  # one real tensor per meta tensor: tied names stay tied
    state = {}
    for name, t in _layer_state(traced, layer).items():
        if id(t) not in made:
            made[id(t)] = _materialize(t, device, dtype)
        state[name] = made[id(t)]
    args, kwargs = tree_map_only(torch.Tensor, lambda t: _materialize(t, device, dtype), _layer_inputs(traced, layer))
    state_keys = {_storage_key(t) for t in state.values()}

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    saved: list[torch.Tensor] = []
    saved_bytes = 0.0
    forward_s, backward_s = [], []
    round_index = 0
    while round_index <= repeats or sum(forward_s[1:]) + sum(backward_s[1:]) < min_time_s:
        # round 0 warms up and counts saved tensors
        counting = torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t) \
            if round_index == 0 else contextlib.nullcontext()
        synchronize()
        start = time.perf_counter()
        with counting:
            output = torch.func.functional_call(module, state, args, kwargs)
            final = loss(output) if loss is not None else output
        synchronize()
        middle = time.perf_counter()
        if round_index == 0:
            kept = {_storage_key(t): t.untyped_storage().nbytes() for t in saved
                    if t.dim() > 0 and _storage_key(t) not in state_keys}
            saved_bytes, saved = float(sum(kept.values())), []
        roots = [t for t in _tensors(final) if t.requires_grad]
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
        synchronize()
        forward_s.append(middle - start)
        backward_s.append(time.perf_counter() - middle)
        round_index += 1
    average = statistics.mean if min_time_s else statistics.median
    return LayerMeasurement(forward_s=average(forward_s[1:]), backward_s=average(backward_s[1:]),
                            saved_bytes=saved_bytes)
