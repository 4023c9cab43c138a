"""Tensor parallelism (Megatron-LM) with `torch.distributed.tensor.parallel`.

A plan gives a style per module path (`TPSite`); this file turns each into torch's
parallel style and calls `parallelize_module` once:

| plan style          | torch style                                              |
|---------------------|----------------------------------------------------------|
| `colwise`           | `ColwiseParallel()`: weight rows split, output local      |
| `rowwise`           | `RowwiseParallel()`: weight columns split, output all-reduced |
| `vocab_embedding`   | `RowwiseParallel()` on `nn.Embedding`: vocab rows split   |
| `vocab_output`      | `ColwiseParallel(output_layouts=Replicate())`: full logits |
| `sequence_parallel` | `SequenceParallel()` on norms/dropout (with `sequence_parallel`) |

The inputs of each group of colwise Linears (attention's q/k/v, the MLP's up/gate) are
prepared once on their parent module, so a group costs one backward all-reduce (or,
with sequence parallelism, one all-gather forward and one reduce-scatter backward), as
in Megatron-LM, and the parent sees its input's global shape (`B, T, _ = x.shape`).

A fused q|k|v Linear (`fused_sizes`) has its output rows permuted before sharding so
that rank i's contiguous shard is [q_i | k_i | v_i]: `chunk(3, dim=-1)` of the local
output gives the local heads. `gather_full_state_dict` undoes the permutation.

    >>> apply_tensor_parallel(model, mesh["tp"], plan.tp_styles, plan.tp_divide_attrs,  # doctest: +SKIP
    ...                       plan.sequence_parallel)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from autoplan.plan import TPSite

FUSED_PERMUTATIONS_ATTR = "_autoplan_fused_row_permutations"
"""Attribute set on the parallelized root: parameter name -> row permutation applied."""


def fused_row_permutation(fused_sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that puts [part_0 shard i | part_1 shard i | ...] at shard i of a dim-0 split.

    >>> fused_row_permutation([2, 2, 2], 2).tolist()   # q0 k0 v0 | q1 k1 v1
    [0, 2, 4, 1, 3, 5]
    """
    starts = [sum(fused_sizes[:j]) for j in range(len(fused_sizes))]
    order = []
    for rank in range(tp):
        for start, size in zip(starts, fused_sizes):
            local = size // tp
            order.extend(range(start + rank * local, start + (rank + 1) * local))
    return torch.tensor(order)


def _permute_fused_rows(module: nn.Module, styles: dict[str, TPSite], tp: int) -> dict[str, torch.Tensor]:
    """Permute the rows of every fused colwise Linear in place; returns name -> permutation."""
    permutations = {}
    for path, site in styles.items():
        if not site.fused_sizes:
            continue
        linear = module.get_submodule(path)
        total = sum(site.fused_sizes)
        if total != linear.weight.shape[0] or any(size % tp for size in site.fused_sizes):
            raise ValueError(f"{path}: fused_sizes {site.fused_sizes} must sum to the output features "
                             f"{linear.weight.shape[0]} and each be divisible by tp={tp}")
        order = fused_row_permutation(site.fused_sizes, tp)
        with torch.no_grad():
            for name, param in linear.named_parameters(recurse=False):
                param.copy_(param[order.to(param.device)])
                permutations[f"{path}.{name}"] = order
    return permutations


def _divide_attributes(module: nn.Module, divide_attrs: dict[str, int], tp: int) -> None:
    """`self.num_heads = 12` -> 12 // tp on the module at "path.num_heads"."""
    for key, value in divide_attrs.items():
        path, _, attr = key.rpartition(".")
        if value % tp:
            raise ValueError(f"tp={tp} does not divide {key}={value}")
        setattr(module.get_submodule(path) if path else module, attr, value // tp)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _torch_styles(styles: dict[str, TPSite], sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan styles -> torch parallel styles, with the layouts sequence parallelism needs.

    With sequence parallelism the activations between a rowwise Linear and the next
    colwise group are sharded along the sequence (dim 1): rowwise outputs reduce-scatter
    to Shard(1), norms run on Shard(1), and each colwise group's parent all-gathers.
    `styles` must be in model order: the first sequence-parallel site's parent (the
    first block) is where the replicated stream is split along the sequence.
    """
    sequence_parallel = sequence_parallel and any(s.style == "sequence_parallel" for s in styles.values())
    if sequence_parallel and any(s.style == "vocab_embedding" for s in styles.values()):
        # Norms/dropouts in the root between a vocab-split embedding and the first block (GPT's
        # embedding dropout) see the replicated embedding stream, which is only split along the
        # sequence inside the first block: they run replicated, like the embedding itself.
        first_in_block = next((i for i, (p, s) in enumerate(styles.items())
                               if s.style == "sequence_parallel" and _parent(p)), len(styles))
        styles = {p: s for i, (p, s) in enumerate(styles.items())
                  if not (s.style == "sequence_parallel" and not _parent(p) and i < first_in_block)}
    stream = Shard(1) if sequence_parallel else Replicate()
    torch_styles: dict[str, ParallelStyle] = {}
    colwise_parents = [_parent(p) for p, s in styles.items() if s.style == "colwise" and _parent(p)]
    for parent in set(colwise_parents):
        # The group's Linears share one DTensor input: one all-gather (SP) and one backward
        # all-reduce / reduce-scatter per group. A lone colwise Linear without SP prepares its
        # own input instead, so a parent that also uses its input elsewhere (a residual) works.
        if sequence_parallel or colwise_parents.count(parent) > 1:
            torch_styles[parent] = PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),))
    for path, site in styles.items():
        if site.style == "colwise":
            torch_styles[path] = ColwiseParallel()
        elif site.style == "rowwise":
            torch_styles[path] = RowwiseParallel(output_layouts=stream)
        elif site.style == "vocab_embedding":
            # Replicated output even with SP: models may add position embeddings to it first;
            # the first sequence-parallel layer takes its shard of the sequence (no communication).
            torch_styles[path] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif site.style == "vocab_output":
            torch_styles[path] = ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
        elif sequence_parallel:
            torch_styles[path] = SequenceParallel(use_local_output=True)  # the residual stream stays local
    if sequence_parallel and any(s.style == "vocab_embedding" for s in styles.values()):
        first_sp_site = next(p for p, s in styles.items() if s.style == "sequence_parallel")
        entry = _parent(first_sp_site)
        if not entry or entry in torch_styles:
            raise ValueError(f"sequence parallelism must start inside a block: the first sequence_parallel site "
                             f"{first_sp_site!r} sits in {entry or 'the root'!r}, the root or a colwise group")
        torch_styles[entry] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                 use_local_output=True)
    return torch_styles


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, styles: dict[str, TPSite],
                          divide_attrs: dict[str, int], sequence_parallel: bool) -> None:
    """Split `module` over `tp_mesh` in place according to the plan's `styles`.

    Parameters of split modules become DTensors sharded on `tp_mesh`; tied parameters
    (an embedding shared with the output head, both split along the vocab) stay one
    parameter.

    >>> apply_tensor_parallel(gpt, mesh["tp"], {"blocks.0.mlp.c_fc": TPSite(style="colwise"),  # doctest: +SKIP
    ...                       "blocks.0.mlp.c_proj": TPSite(style="rowwise")}, {}, False)
    """
    tp = tp_mesh.size()
    if tp == 1 or not styles:
        return
    for path in styles:
        module.get_submodule(path)  # AttributeError names a missing path before anything changes
    ties = _tied_parameter_names(module)
    setattr(module, FUSED_PERMUTATIONS_ATTR, _permute_fused_rows(module, styles, tp))
    _divide_attributes(module, divide_attrs, tp)
    order = {name: index for index, (name, _) in enumerate(module.named_modules())}
    in_model_order = dict(sorted(styles.items(), key=lambda item: order[item[0]]))
    parallelize_module(module, tp_mesh, _torch_styles(in_model_order, sequence_parallel))
    _retie(module, ties)


def _tied_parameter_names(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (named_parameters lists only the first)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, ties: list[list[str]]) -> None:
    """`distribute_module` replaces each module's parameters separately: point every name
    of a tied group back at the first one's (now DTensor) parameter."""
    for names in ties:
        owner_path, _, owner_attr = names[0].rpartition(".")
        shared = getattr(module.get_submodule(owner_path), owner_attr)
        for name in names[1:]:
            path, _, attr = name.rpartition(".")
            other = module.get_submodule(path)
            if getattr(other, attr).shape != shared.shape or \
                    getattr(getattr(other, attr), "placements", None) != getattr(shared, "placements", None):
                raise ValueError(f"tied parameters {names[0]} and {name} are split differently by the plan")
            setattr(other, attr, shared)


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict with its ORIGINAL keys and full plain tensors, on every rank.

    Gathers DTensor shards (tensor and/or data parallel) and undoes fused-row
    permutations. A collective: every rank of the module's mesh must call it.
    """
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    for name, order in getattr(module, FUSED_PERMUTATIONS_ATTR, {}).items():
        if name in state:
            state[name] = state[name][torch.argsort(order).to(state[name].device)]
    return state
