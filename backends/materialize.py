"""Start a model built on the meta device: each rank allocates only its own shard, then
initialises it with the model's own initialisation, the same whatever the plan.

    >>> with torch.device("meta"):
    ...     model = GPT(config)                           # no memory: shapes and dtypes only  # doctest: +SKIP
    >>> init = InitRecipe.of(model, seed=0)                # before any technique  # doctest: +SKIP
    >>> apply_techniques(model, plan, mesh)                # TP / FSDP2 split the meta tensors  # doctest: +SKIP
    >>> materialize(model, init, torch.device("cpu"))      # this rank's shards, initialised  # doctest: +SKIP

`materialize` first allocates the rank's tensors, uninitialised, with `nn.Module.to_empty`
(after tensor parallelism, FSDP2 and the pipeline split, so only local shards: DTensor
local tensors, FSDP2's padded shards, this pipeline rank's stages). Then, one module at a
time, so that at most one module's full tensors exist beside the shards:

1. a stand-in of the module (its class and attributes as built, its own tensors full-size
   on the rank's device, its children on meta) is initialised under a seed derived from
   (seed, the module's name): its `reset_parameters()` (what torch's layers run when they
   are built; `_reset_parameters()` for `nn.MultiheadAttention`), then the nearest
   ancestor's `_init_weights(module)`: Hugging Face's per-module hook (what `post_init`
   runs), which the zoo's models define too;
2. this rank's part of each full tensor is copied into the local one: sliced by the
   DTensor's placements with `distribute_tensor(..., src_data_rank=None)` (no
   communication; fused q|k|v rows permuted first, as tensor parallelism did), whole for a
   plain tensor.

Every rank thus computes the same full values, which makes them independent of the plan
(dp, tp, pp, ZeRO): the gathered full state dict is the same for one seed. (DTensor's
own random ops would not do: on CPU they do not reproduce a full tensor's values.) They
depend on the device type (CPU and CUDA generators differ) and differ from the values a
model built on a real device gets from the global generator.

A tensor shared by several modules (a tied embedding and output head) takes the value of
its first owner in module order (the embedding, as Hugging Face's `tie_weights` does),
also on a pipeline stage that holds only a copy of it. A tensor already on a real device
when the recipe is taken keeps its value (a buffer built on CPU in `__init__`). A
floating-point tensor that no initialiser writes, which would train on garbage, is a
ValueError naming it. Writes an initialiser makes to a child module's tensors are not kept:
the child initialises its own.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from autoplan.backends.pipeline_split import original_fqn
from autoplan.backends.tensor_parallel import FUSED_PERMUTATIONS_ATTR

INIT_HOOK = "_init_weights"
"""The per-module initialisation hook a model may define (Hugging Face's name for it)."""
RESET_METHODS = ("reset_parameters", "_reset_parameters")
"""A module's own initialisation, as its constructor runs it (the second: nn.MultiheadAttention)."""


def is_on_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer of `model` is on the meta device.

    >>> is_on_meta(nn.Linear(2, 2, device="meta")), is_on_meta(nn.Linear(2, 2))
    (True, False)
    """
    return any(tensor.is_meta for tensor in chain(model.parameters(), model.buffers()))


@dataclass
class InitRecipe:
    """How every tensor of a model on meta gets its value; taken before any technique
    changes the model (see the module docstring)."""

    seed: int
    owners: dict[str, tuple[str, str]]
    """Every parameter and buffer name (tied names included) -> (owner module, attribute)."""
    stand_ins: dict[str, nn.Module]
    """Owner module name -> a meta copy of it as built (module order)."""
    hooks: dict[str, Callable[[nn.Module], None] | None]
    """Owner module name -> the nearest ancestor's `_init_weights`, or None."""
    given: dict[str, torch.Tensor]
    """Name -> value of each tensor that was already on a real device."""

    @classmethod
    def of(cls, model: nn.Module, seed: int = 0) -> InitRecipe:
        """The recipe of `model` (wholly or partly on meta) for `seed`.

        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> init = InitRecipe.of(model, seed=0)
        >>> init.owners["1.bias"], sorted(init.stand_ins)
        (('1', 'bias'), ['0', '1'])
        """
        first_owner: dict[int, tuple[str, str]] = {}
        owners: dict[str, tuple[str, str]] = {}
        given: dict[str, torch.Tensor] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            for attr, tensor in chain(module._parameters.items(), module._buffers.items()):
                if tensor is None:
                    continue
                name = f"{path}.{attr}" if path else attr
                owners[name] = first_owner.setdefault(id(tensor), (path, attr))
                if not tensor.is_meta:
                    given[name] = tensor.detach().clone()  # to_empty later swaps the original's data
        owner_paths = dict.fromkeys(path for path, _ in owners.values())
        return cls(
            seed=seed,
            owners=owners,
            stand_ins={path: _stand_in(model.get_submodule(path)) for path in owner_paths},
            hooks={path: _init_hook(model, path) for path in owner_paths},
            given=given,
        )


def _stand_in(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` owning fresh meta tensors of the same shapes, and children
    that are stand-ins too: what later changes to the model (TP, FSDP2, to_empty) leave alone."""
    clone = copy.copy(module)
    clone._parameters = {
        name: None if param is None else nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for name, param in module._parameters.items()
    }
    clone._buffers = {
        name: None if buffer is None else torch.empty_like(buffer, device="meta")
        for name, buffer in module._buffers.items()
    }
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._modules = {name: None if child is None else _stand_in(child) for name, child in module._modules.items()}
    return clone


def _init_hook(model: nn.Module, path: str) -> Callable[[nn.Module], None] | None:
    """`_init_weights` of the nearest module on the way from `path` up to the root that
    defines one (Hugging Face dispatches a sub-model's modules to the sub-model's own)."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:depth])), INIT_HOOK, None)
        if callable(hook):
            return hook
    return None


def module_seed(seed: int, path: str) -> int:
    """The generator seed of the module at `path`: the same in every process and plan.

    >>> module_seed(0, "blocks.0.attn.c_attn") == module_seed(0, "blocks.0.attn.c_attn")
    True
    """
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _live_copy(stand_in: nn.Module, device: torch.device) -> nn.Module:
    """The stand-in with its own tensors full-size on `device`: NaN where floating point (so
    an initialiser that leaves one unwritten is seen), zero otherwise; children stay on meta."""
    live = copy.copy(stand_in)

    def blank(tensor: torch.Tensor) -> torch.Tensor:
        fill = float("nan") if tensor.is_floating_point() or tensor.is_complex() else 0
        return torch.full(tensor.shape, fill, dtype=tensor.dtype, device=device)

    live._parameters = {
        name: None if param is None else nn.Parameter(blank(param), param.requires_grad)
        for name, param in stand_in._parameters.items()
    }
    live._buffers = {name: None if buffer is None else blank(buffer) for name, buffer in stand_in._buffers.items()}
    return live


def _initialise(init: InitRecipe, path: str, device: torch.device) -> nn.Module:
    """The module at `path` with full tensors on `device`, initialised as the module docstring says."""
    live = _live_copy(init.stand_ins[path], device)
    hook = init.hooks[path]
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
        torch.manual_seed(module_seed(init.seed, path))
        reset = next((getattr(live, name) for name in RESET_METHODS if callable(getattr(live, name, None))), None)
        if reset is not None:
            reset()
        if hook is not None:
            hook(live)
    return live


def _initialised_value(live: nn.Module, attr: str, name: str) -> torch.Tensor:
    """`live`'s tensor `attr`; ValueError when an initialiser left any of it unwritten (NaN)."""
    value = getattr(live, attr).detach()
    if (value.is_floating_point() or value.is_complex()) and value.isnan().any():
        kind = type(live).__name__
        raise ValueError(
            f"{name} ({kind}) is not set by its initialisation: give {kind} a reset_parameters(), "
            f"or the model an {INIT_HOOK}(module) that sets it, or build the model on a real device"
        )
    return value


def full_tensors(init: InitRecipe, names: list[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full initialised value on `device`) for each of `names`, one owner module at a
    time: a consumer that keeps only its shard of each holds one module's full size at most.

    >>> with torch.device("meta"):
    ...     model = nn.Linear(3, 2)
    >>> dict(full_tensors(InitRecipe.of(model), ["bias"], torch.device("cpu")))["bias"].shape
    torch.Size([2])
    """
    by_owner: dict[str, list[str]] = {}
    for name in names:
        if name in init.given:
            yield name, init.given[name].to(device)
        else:
            by_owner.setdefault(init.owners[name][0], []).append(name)
    for path in (path for path in init.stand_ins if path in by_owner):  # module order
        live = _initialise(init, path, device)
        for name in by_owner[path]:
            yield name, _initialised_value(live, init.owners[name][1], name)
        del live


def materialize(module: nn.Module, init: InitRecipe, device: torch.device) -> None:
    """Allocate `module`'s tensors on `device` (only this rank's shards: call it after the
    techniques are applied) and fill them from `init`, in place. `module` is the model or a
    pipeline stage; its tensor names are the model's, up to wrapper prefixes (recompute's
    checkpoint wrapper). Parameters keep their identity, so ties hold.

    >>> with torch.device("meta"):
    ...     model = nn.Linear(3, 2)
    >>> init = InitRecipe.of(model, seed=0)
    >>> materialize(model, init, torch.device("cpu"))
    >>> model.weight.device, bool(model.weight.isfinite().all())
    (device(type='cpu'), True)
    """
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keeps objects: ties and FSDP2 hold
    try:
        module.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    local = {original_fqn(name): tensor for name, tensor in chain(module.named_parameters(), module.named_buffers())}
    missing = sorted(set(local) - set(init.owners))
    assert not missing, f"tensors the model did not have when its recipe was taken: {missing}"
    permutations = getattr(module, FUSED_PERMUTATIONS_ATTR, {})
    for name, full in full_tensors(init, list(local), device):
        if name in permutations:
            order, dim = permutations[name]
            full = full.index_select(dim, order.to(device))
        _copy_shard(local[name], full)


def _copy_shard(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `target` (a DTensor's local shard, or all of it)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
            local = target.to_local()
            assert local.shape == shard.shape, f"local shard {tuple(local.shape)} != {tuple(shard.shape)}"
            local.copy_(shard)
        else:
            target.copy_(full)
