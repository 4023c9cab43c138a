"""Activation storage: a layer keeps the tensors autograd saves for backward in a narrower
dtype than it computes in, through torch's `saved_tensors_hooks` (quantize on save,
dequantize on unpack). bfloat16 is a cast; float8_e4m3fn scales each tensor by
448 / amax (its largest finite value over the tensor's largest magnitude) before the cast.

    >>> apply_activation_storage(model, {"blocks.0": "float8_e4m3fn"})    # doctest: +SKIP

The forward is unchanged (it computes in the compute dtype); only backward reads the
dequantized copies, so the loss of a step is exact and the gradients carry the storage's
rounding (`docs/precision.md` gives the measured effect on training).

What is stored narrower: floating tensors at least as large as the layer's input
(activations: the block input, q/k/v, the MLP hidden, attention probabilities). Parameters
and views of them (a Linear saves its weight) stay as they are, and so do smaller saved
statistics (a norm's mean and rstd, attention's logsumexp), which backward needs exact and
which hold little memory. Hooks on the layer's forward (pre-hook enters, forward hook leaves,
also when forward raises) keep its parameter names; tensor-parallel DTensors are stored
as their local shard.

Each storage is stored once, however many tensors over it autograd saves: ops save their own
views (each Linear of q/k/v or gate/up saves `x.view(-1, h)` of the one normed input; attention
saves its output and the projection after it saves `transpose(1, 2).reshape(...)` of it), and a
copy per view would keep more than the original. A tensor that is its whole storage in some
order of dimensions is stored as that storage, flat, and each view is rebuilt over one
dequantized copy (`as_strided`); a partial view (q, k, v as chunks of the fused q|k|v) is stored
on its own. The originals are not held: each is freed when the forward drops it, so the layer's
peak holds its stored copies, not its full-precision activations beside them. Backward
dequantizes per node (what the node reads, freed when it ends): the peak adds one node's saved
tensors in the compute dtype (`LayerProfile.largest_node_saved_bytes` in the cost model).

The hooks do not nest inside activation checkpointing, whose own
hooks decide what is saved: the planner offers narrower storage with recompute "none" only.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from autoplan.backends.precision import to_dtype

FLOAT8_MAX = 448.0
"""torch.finfo(torch.float8_e4m3fn).max."""


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (a leaf that requires grad, or its `_base`)."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


class ActivationStorage:
    """The pack and unpack hooks of one layer, storing in `dtype`.

    >>> storage = ActivationStorage(torch.float8_e4m3fn)
    >>> storage.min_numel = 1
    >>> x = torch.tensor([1.0, -0.5, 3.0])
    >>> storage.unpack(storage.pack(x))      # 3 bits of mantissa: 1.0 * 448/3 = 149.3 stores as 144
    tensor([ 0.9643, -0.4821,  3.0000])
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.min_numel = 0
        """Smallest tensor stored narrower: the layer's input size, set at each forward."""
        self.packed: dict[tuple, tuple] = {}
        """This forward's stored copies by storage (and, for a partial view, its offset, shape
        and strides): one copy of what several ops save (a norm's input is also the residual,
        a Linear input is a view of the norm's output). An entry leaves when its storage is
        freed (a weakref finalizer: its key is not reused meanwhile) or the forward ends."""

    def pack(self, tensor: torch.Tensor):
        if (
            not tensor.is_floating_point()
            or tensor.dtype.itemsize <= self.dtype.itemsize
            or tensor.numel() < max(self.min_numel, 1)
            or _is_parameter(tensor)
        ):
            return tensor
        spec = None
        local = tensor.detach()
        if isinstance(tensor, DTensor):
            spec = (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())
            local = local.to_local()  # type: ignore[attr-defined]
        whole = _covers_storage(local)
        storage = local.untyped_storage()
        key: tuple = (storage._cdata, local.dtype)
        if not whole:
            key += (local.storage_offset(), tuple(local.shape), local.stride())
        if key not in self.packed:
            flat = local.as_strided((local.numel(),), (1,)) if whole else local
            self.packed[key] = self._quantize(flat)
            # The original is not held: it is freed when the forward drops it, and its entry then.
            weakref.finalize(storage, self.packed.pop, key, None)
        view = (tuple(local.shape), local.stride()) if whole else None
        return ("dtensor" if spec else "local", spec, self.packed[key], view)

    def _quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.dtype]:
        if self.dtype != torch.float8_e4m3fn:
            return tensor.to(self.dtype), None, tensor.dtype
        scale = FLOAT8_MAX / tensor.abs().amax().float().clamp(min=1e-12)
        return (tensor.float() * scale).to(self.dtype), scale, tensor.dtype

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        kind, spec, (stored, scale, dtype), view = packed
        local = stored.to(dtype) if scale is None else (stored.float() / scale).to(dtype)
        if view is not None:
            local = local.as_strided(*view)
        if kind == "local":
            return local
        mesh, placements, shape, stride = spec
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)


def _covers_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is its whole storage, each element once in some order of dimensions
    (a reshaped or transposed view of a dense tensor: the Linear input `x.view(-1, h)` beside
    `x`, attention's output beside its `transpose(1, 2).reshape(...)`)."""
    if tensor.numel() * tensor.element_size() != tensor.untyped_storage().nbytes():
        return False
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def apply_activation_storage(module: nn.Module, choices: dict[str, str]) -> None:
    """Store the saved activations of each layer path in `choices` in its dtype, in place."""
    for path, dtype_name in choices.items():
        layer = module.get_submodule(path)
        storage = ActivationStorage(to_dtype(dtype_name))
        hooks = torch.autograd.graph.saved_tensors_hooks(storage.pack, storage.unpack)

        def enter(layer, args, kwargs, storage=storage, hooks=hooks):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            storage.min_numel = first.numel() if first is not None and first.is_floating_point() else 0
            hooks.__enter__()

        def leave(layer, args, output, storage=storage, hooks=hooks):
            hooks.__exit__(None, None, None)
            storage.packed.clear()

        layer.register_forward_pre_hook(enter, with_kwargs=True)
        layer.register_forward_hook(leave, always_call=True)
