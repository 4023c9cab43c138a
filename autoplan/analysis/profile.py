"""Profile a model layer by layer for ONE sequence: FLOPs, saved activations, tp collectives.

    >>> from autoplan import zoo
    >>> job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    >>> profile = profile_model(job.module, job.example_inputs, model_name="gpt-tiny")
    >>> profile.global_batch_size, profile.seq_len, profile.layers[3].name
    (4, 32, 'blocks.0')
    >>> profile.layers[3].saved_bytes["full"]       # the block input: 32 tokens * 64 * 4 bytes
    8192.0

Every example input is cut to its first sequence (dim 0 -> 1) and traced on meta tensors
(`autoplan.analysis.trace`); each distinct layer (one per signature: the 96 GPT-3 blocks cost
one) then runs forward and backward on meta tensors (`autoplan.analysis.meta_layer`: FLOPs,
what autograd keeps per recompute option, the tensor-parallel split share and collectives,
elementwise traffic). Here those per-layer costs become the ModelProfile: parameters
counted once per tensor (tied ones with the first layer that holds them, those outside
every layer with the first layer), a layer forward calls several times charged per call,
and `check_conservation` refusing a trace that leaves part of the model out.

With `measure=True` each distinct layer is also timed on a real device
(`autoplan.analysis.measured_layer.measure_layer`: random weights, inputs of the traced
shapes); `autoplan.measure.profile_store` calls it once per distinct layer and micro-batch
size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from autoplan.analysis.measured_layer import bind_loss, device_name, measure_layer
from autoplan.analysis.meta_layer import _tensor_bytes, profile_layer
from autoplan.analysis.stage_cuts import stage_start_blockers
from autoplan.analysis.trace import TracedModel, _tensors, trace_model
from autoplan.errors import TraceError
from autoplan.schema.profile import LayerProfile, ModelProfile


def _batched_first_input(example_inputs: tuple) -> torch.Tensor:
    """`example_inputs[0]`, checked to be a tensor with a batch dim 0 (ValueError otherwise)."""
    first = example_inputs[0] if example_inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        shape = "" if first is None else " of shape " + str(tuple(getattr(first, "shape", ())))
        raise ValueError(
            f"example_inputs[0] must be a tensor whose dim 0 is the batch; got {type(first).__name__}{shape}"
        )
    return first


def _layer_costs(module: nn.Module, traced: TracedModel, name: str, loss: Callable | None) -> dict[str, Any]:
    """`profile_layer`'s meta-tensor costs of layer `name`; a failure becomes a ValueError
    naming the layer and its module type."""
    try:
        return profile_layer(traced, name, loss)
    except Exception as error:
        raise ValueError(
            f"cannot profile layer {name!r} ({type(module.get_submodule(name)).__name__}) "
            f"forward and backward on meta tensors: {type(error).__name__}: {error}"
        ) from error


def _measured_costs(traced: TracedModel, name: str, device: torch.device, loss: Callable | None) -> dict[str, Any]:
    """The measured forward and backward time of layer `name` on `device`, as profile fields."""
    measured = measure_layer(traced, name, device, loss=loss)
    return {
        "measured_fwd_s": measured.forward_s,
        "measured_bwd_s": measured.backward_s,
        "measured_device": device_name(device),
    }


def profile_model(
    module: nn.Module,
    example_inputs: tuple,
    model_name: str = "model",
    loss_fn: Callable | None = None,
    *,
    targets: torch.Tensor | None = None,
    measure: bool = False,
    device: str | torch.device | None = None,
) -> ModelProfile:
    """Per-layer costs of one sequence of `example_inputs` (one global batch; dim 0 is the batch).

    `loss_fn(output, targets)` is profiled as part of the last layer (with `targets` cut to
    one sequence; without targets it is called with None, and a loss that needs targets is
    left out). `measure=True` also times each distinct layer's forward and backward for one
    sequence on `device` (default: CUDA when available, else CPU; see `measure_layer`).

        >>> profile = profile_model(model, (tokens,), model_name="gpt2-small")   # doctest: +SKIP
        >>> [(layer.name, layer.fwd_flops) for layer in profile.layers]         # doctest: +SKIP
    """
    first = _batched_first_input(example_inputs)
    one_sequence = tuple(_first_sequence(x) for x in example_inputs)
    traced = trace_model(module, one_sequence)
    loss = bind_loss(loss_fn, _first_sequence(targets), torch.device("meta"))
    measure_device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    costs: dict[tuple[str, bool], dict[str, Any]] = {}
    counted: set[int] = set()
    layers = []
    for layer in traced.layers:
        with_loss = loss is not None and layer == traced.layers[-1]
        key = (traced.representative(layer), with_loss)  # the loss rides on the last layer only
        if key not in costs:
            costs[key] = _layer_costs(module, traced, key[0], loss if with_loss else None)
            if measure:
                measured_loss = bind_loss(loss_fn, _first_sequence(targets), measure_device) if with_loss else None
                costs[key].update(_measured_costs(traced, key[0], measure_device, measured_loss))
        param_count, tp_param_count, param_tensors = _count_parameters(traced, layer, counted)
        layer_tp = traced.tp[layer]
        layers.append(
            LayerProfile(
                name=layer,
                signature=traced.signatures[layer],
                param_count=param_count,
                tp_param_count=tp_param_count,
                param_tensors=param_tensors,
                tp_sites=layer_tp.sites,
                tp_divisors=layer_tp.divisors,
                tp_divide_attrs=layer_tp.divide_attrs,
                **_repeated(costs[key], traced.num_calls[layer]),
            )
        )
    _charge_unowned_parameters(traced, layers, counted)
    check_conservation(traced, layers)

    inputs_bytes = sum(_tensor_bytes(t) for t in _tensors(one_sequence))
    is_tokens = first.dim() == 2 and not first.is_floating_point() and not first.is_complex()
    return ModelProfile(
        model_name=model_name,
        layers=layers,
        global_batch_size=int(first.shape[0]),
        seq_len=int(first.shape[1]) if is_tokens else 1,
        input_bytes=float(inputs_bytes),
        tied_parameters=traced.tied_parameters,
        fingerprint=_fingerprint(module, traced),
        num_params=sum(p.numel() for p in module.parameters()),
        model_flops_per_sequence=sum(layer.fwd_flops + layer.bwd_flops for layer in layers),
        sequence_parallel_blocker=traced.sequence_parallel_blocker,
        stage_start_blockers=stage_start_blockers(traced),
    )


def _repeated(cost: dict[str, Any], num_calls: int) -> dict[str, Any]:
    """A layer's costs when forward calls it `num_calls` times (T5's shared embedding): every
    call computes and keeps its own activations; the output crossing a cut is the last call's."""
    if num_calls == 1:
        return cost
    scaled = dict(cost)
    for name in (
        "fwd_flops",
        "bwd_flops",
        "attention_fwd_flops",
        "attention_bwd_flops",
        "elementwise_bytes",
        "forward_ops",
        "backward_ops",
        "tp_allreduce_bytes_fwd",
        "tp_allreduce_bytes_bwd",
    ):
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
        raise TraceError(
            f"profile of {model} holds {counted:,} parameters but the model has {expected:,}: "
            f"layers {[layer.name for layer in layers]} do not cover it"
        )
    glue = sum(traced.glue_flops.values())
    layer_flops = sum(layer.fwd_flops for layer in layers)
    if glue > GLUE_FLOPS_TOLERANCE * (glue + layer_flops):
        where = ", ".join(f"{path or '<root>'} {flops:.3g}" for path, flops in traced.glue_flops.items() if flops)
        raise TraceError(
            f"{model}: {glue / (glue + layer_flops):.1%} of the forward FLOPs run outside every layer "
            f"(> {GLUE_FLOPS_TOLERANCE:.0%}; by module: {where}): move that computation into a "
            f"submodule so a layer owns it"
        )


def _first_sequence(value: Any) -> Any:
    return value[:1] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value


def _fingerprint(module: nn.Module, traced: TracedModel) -> str:
    text = [traced.signatures[layer] for layer in traced.layers]
    text += [f"{name}:{tuple(p.shape)}" for name, p in module.named_parameters(remove_duplicate=False)]
    return hashlib.sha256("\n".join(text).encode()).hexdigest()[:16]


def _count_parameters(traced: TracedModel, layer: str, counted: set[int]) -> tuple[int, int, int]:
    """Elements of the layer's parameters not counted by an earlier layer, of those the
    tp-split ones (colwise and vocab weights and biases, rowwise weights: a rowwise bias is
    added after the all-reduce, so it stays whole), and the number of those tensors."""
    module = traced.module.get_submodule(layer)
    split: set[int] = set()  # ids of the split parameters
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
