"""Measure a parallel model's training step: wall time per step and this rank's peak memory.

    >>> measurement = measure_training(pm, [(inputs, targets)], steps=5)   # doctest: +SKIP
    >>> measurement.median_step_s, measurement.peak_memory_bytes           # doctest: +SKIP
    (0.41, 130_000_000)

Peak memory is what the cost model predicts: parameters + gradients + optimizer states +
activations (and communication buffers) of this rank, not the process's resident size.
On CUDA it is `torch.cuda.max_memory_allocated`. On CPU it is counted by
`AllocationTracker`, a dispatch mode that adds up the bytes of every live tensor storage.
(`torch.distributed._tools.mem_tracker.MemTracker` would count the same things, but it
refuses a module called more than once per iteration, which every pipeline schedule
with several micro-batches does.)
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_map_only

MEMORY_STEPS = 2
"""Warm-up steps run under the memory tracker: the second is the first with optimizer states."""


class TrainsSteps(Protocol):
    """What `measure_training` needs of a model (autoplan's ParallelModel has it)."""

    def train_step(
        self, inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor | None = None
    ) -> float: ...

    def parameters(self): ...


@dataclass
class Measurement:
    """Per-step wall times after warm-up and this rank's peak memory."""

    step_times_s: list[float]
    """Seconds per timed step, barrier to barrier (optimizer step included)."""
    peak_memory_bytes: int
    """This rank's peak bytes of live tensors over the warm-up steps (see module docstring)."""
    losses: list[float] = field(default_factory=list)
    """The loss of every step, warm-up included."""

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times_s)


def measure_training(
    model: TrainsSteps,
    batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]],
    steps: int,
    warmup: int = 1,
    lr: float = 1e-4,
) -> Measurement:
    """Train `warmup` + `steps` steps with AdamW (the optimizer the planner assumes) and time the last `steps`.

    `batches` are (inputs, targets) global batches, used in turn. Every step is bracketed
    by barriers when a process group exists, so a step's time is the slowest rank's.
    Memory is tracked over max(warmup, MEMORY_STEPS) warm-up steps; the timed steps run
    untracked so the tracker's per-operation cost stays out of the times.

    >>> measure_training(pm, [((tokens,), targets)], steps=3).median_step_s   # doctest: +SKIP
    0.12
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not batches:
        raise ValueError("batches must hold at least one (inputs, targets) pair")
    parameters = list(model.parameters())
    on_cuda = any(p.device.type == "cuda" for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    losses: list[float] = []

    def step(index: int) -> float:
        inputs, targets = batches[index % len(batches)]
        _synchronize(on_cuda)
        start = time.perf_counter()
        losses.append(model.train_step(inputs, targets))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(on_cuda)
        return time.perf_counter() - start

    num_warmup = max(warmup, MEMORY_STEPS)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        for index in range(num_warmup):
            step(index)
        peak = torch.cuda.max_memory_allocated()
    else:
        with AllocationTracker() as tracker:
            tracker.track(*parameters)
            for index in range(num_warmup):
                step(index)
        peak = tracker.peak_bytes
    times = [step(num_warmup + index) for index in range(steps)]
    return Measurement(step_times_s=times, peak_memory_bytes=int(peak), losses=losses)


def _synchronize(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class AllocationTracker(TorchDispatchMode):
    """Bytes of live tensor storages created (or `track`ed) while active, and their peak.

    Every operator's outputs are registered by storage, so views and in-place results
    count once; a storage leaves the count when it is freed (a weakref finalizer) and
    changes size with `UntypedStorage.resize_` (how FSDP frees gathered parameters).
    Wrapper subclasses (DTensor) count their local tensors. Tensors that existed before
    entering count only if passed to `track`.

    >>> with AllocationTracker() as tracker:
    ...     a = torch.empty(1000)          # 4,000 bytes
    ...     b = torch.empty(500)           # + 2,000
    ...     del a                          # - 4,000
    ...     c = torch.empty(2000)          # + 8,000
    >>> tracker.peak_bytes
    10000
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}
        self._original_resize: Callable[[torch.UntypedStorage, int], Any] | None = None

    def track(self, *tensors: torch.Tensor) -> None:
        """Count these tensors' storages (e.g. parameters that exist before the tracker)."""
        for tensor in tensors:
            for storage in _storages(tensor, self.device_type):
                self._add(storage)

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self._change(nbytes)
        weakref.finalize(storage, self._remove, key)

    def _remove(self, key: int) -> None:
        self._change(-self._live.pop(key, 0))

    def _change(self, delta: int) -> None:
        self.current_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out

    def __enter__(self):
        # UntypedStorage.resize_ is a storage method, not an operator: the mode cannot see it.
        self._original_resize = original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int):
            result = original(storage, size)
            key = storage._cdata
            if key in tracker._live:
                tracker._change(size - tracker._live[key])
                tracker._live[key] = size
            return result

        setattr(torch.UntypedStorage, "resize_", resize_)  # noqa: B010 (mypy refuses assigning to a method)
        return super().__enter__()

    def __exit__(self, *exc):
        setattr(torch.UntypedStorage, "resize_", self._original_resize)  # noqa: B010 (as in __enter__)
        return super().__exit__(*exc)


def _storages(tensor: torch.Tensor, device_type: str) -> list[torch.UntypedStorage]:
    """The storages behind `tensor`, looking through wrapper subclasses such as DTensor."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return [
            storage for value in inner if isinstance(value, torch.Tensor) for storage in _storages(value, device_type)
        ]
    if tensor.device.type != device_type or tensor.is_sparse or tensor.is_nested:
        return []
    return [tensor.untyped_storage()]
