"""One layer run forward and backward on a real device, for one batch of inputs: random
weights, inputs of the traced shapes (`autoplan.analysis.trace`), median forward and
backward seconds and the bytes autograd kept at the dtype the layer ran in.

`autoplan.analysis.profile` calls it for `profile_model(..., measure=True)`, and
`autoplan.measure.profile_store` once per distinct layer and micro-batch size (the profile
files the planner reads). It lives beside the meta-tensor profile (`meta_layer`), whose
layer state and inputs it makes real, because both start from the same trace.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from autoplan.analysis.meta_layer import _layer_inputs, _layer_state, _storage_key
from autoplan.analysis.trace import TracedModel, _tensors


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


FLUSH_BYTES = 256 * 2**20
"""Bytes written before each timed round to evict the layer's weights from the caches, as
Triton's `do_bench` zeroes a 256 MB buffer before each run: inside a model step the other
layers' traffic has evicted them. Timed warm, one block of examples/custom_model.py measured
2.55 ms at micro-batch 1 and 3.7 ms cold on this 2-core VM (32 MiB L3), and bench_local.py
measured that model's candidates 7-31% slower than the warm profile predicted (16% at the
median of 35); a gpt-small-demo block (compute-bound) measured the same both ways."""

_FLUSH_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _flush_caches(device: torch.device) -> None:
    """Write FLUSH_BYTES on `device` (one buffer per device, kept), evicting what the caches hold."""
    if device not in _FLUSH_BUFFERS:
        _FLUSH_BUFFERS[device] = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    _FLUSH_BUFFERS[device].zero_()


def _real_state(
    traced: TracedModel, layer: str, device: torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """`layer`'s parameters and buffers made real on `device`: one tensor per meta tensor, so
    tied names stay tied."""
    made: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in _layer_state(traced, layer).items():
        if id(t) not in made:
            made[id(t)] = _materialize(t, device, dtype)
        state[name] = made[id(t)]
    return state


def measure_layer(
    traced: TracedModel,
    layer: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    loss: Callable | None = None,
    repeats: int = 3,
) -> LayerMeasurement:
    """Run `layer` of `traced` forward and backward on `device` with random weights and inputs
    of the traced shapes (integer inputs are zeros: valid token ids); floating tensors in `dtype`
    (default: as traced). `loss(output)`, when given, runs after the forward and is timed with it.

    The first round warms up and counts what autograd saves (`saved_tensors_hooks`); each of
    `repeats` more rounds starts from cold caches (`FLUSH_BYTES`), and the times are their
    medians: the layer alone on its device at the machine's typical speed of the moment (the
    least round measured its best: on this 2-core VM every bench candidate came out 5-20%
    short), robust to a minority of rounds another process lengthened.

        >>> traced = trace_model(module, (tokens[:2],))                       # doctest: +SKIP
        >>> measure_layer(traced, "blocks.0", torch.device("cpu")).forward_s  # doctest: +SKIP
        0.0012
    """
    module = traced.module.get_submodule(layer)
    state = _real_state(traced, layer, device, dtype)
    args, kwargs = tree_map_only(torch.Tensor, lambda t: _materialize(t, device, dtype), _layer_inputs(traced, layer))
    state_keys = {_storage_key(t) for t in state.values()}

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    saved: list[torch.Tensor] = []
    saved_bytes = 0.0

    def count_saved(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    forward_s: list[float] = []
    backward_s: list[float] = []
    round_index = 0
    while round_index <= repeats:
        # round 0 warms up and counts saved tensors
        counting = (
            torch.autograd.graph.saved_tensors_hooks(count_saved, lambda t: t)
            if round_index == 0
            else contextlib.nullcontext()
        )
        if round_index > 0:
            _flush_caches(device)  # timed from cold caches, as inside a model step
        synchronize()
        start = time.perf_counter()
        with counting:
            output = torch.func.functional_call(module, state, args, kwargs)
            final = loss(output) if loss is not None else output
        synchronize()
        middle = time.perf_counter()
        if round_index == 0:
            kept = {
                _storage_key(t): t.untyped_storage().nbytes()
                for t in saved
                if t.dim() > 0 and _storage_key(t) not in state_keys
            }
            saved_bytes, saved = float(sum(kept.values())), []
        roots = [t for t in _tensors(final) if t.requires_grad]
        if roots:
            torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
        synchronize()
        forward_s.append(middle - start)
        backward_s.append(time.perf_counter() - middle)
        round_index += 1
    return LayerMeasurement(
        forward_s=statistics.median(forward_s[1:]),
        backward_s=statistics.median(backward_s[1:]),
        saved_bytes=saved_bytes,
    )
