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

from functools import partial
from typing import cast

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES, TPSite

FUSED_PERMUTATIONS_ATTR = "_autoplan_fused_row_permutations"
"""Attribute set on the parallelized root: parameter name -> row permutation applied."""


def fused_row_permutation(fused_sizes: list[int], tp: int) -> torch.Tensor:
    """Row order that puts [part_0 shard i | part_1 shard i | ...] at shard i of a dim-0 split.

    >>> fused_row_permutation([2, 2, 2], 2).tolist()   # q0 k0 v0 | q1 k1 v1
    [0, 2, 4, 1, 3, 5]
    """
    starts = [sum(fused_sizes[:j]) for j in range(len(fused_sizes))]
    order: list[int] = []
    for rank in range(tp):
        for start, size in zip(starts, fused_sizes):
            local = size // tp
            order.extend(range(start + rank * local, start + (rank + 1) * local))
    return torch.tensor(order)


def _permute_fused_rows(module: nn.Module, styles: dict[str, TPSite], tp: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Permute the output features of every fused colwise Linear in place (rows of an
    nn.Linear weight, columns of a transposed Conv1D weight); returns name -> (permutation, dim)."""
    permutations = {}
    for path, site in styles.items():
        if not site.fused_sizes:
            continue
        linear = module.get_submodule(path)
        feature_dim = 0 if isinstance(linear, nn.Linear) else 1
        weight = cast(torch.Tensor, linear.weight)  # an nn.Linear or a transposed Conv1D
        total = sum(site.fused_sizes)
        if total != weight.shape[feature_dim] or any(size % tp for size in site.fused_sizes):
            raise ValueError(
                f"{path}: fused_sizes {site.fused_sizes} must sum to the output features "
                f"{weight.shape[feature_dim]} and each be divisible by tp={tp}"
            )
        order = fused_row_permutation(site.fused_sizes, tp)
        with torch.no_grad():
            for name, param in linear.named_parameters(recurse=False):
                dim = feature_dim if name == "weight" else 0
                param.copy_(param.index_select(dim, order.to(param.device)))
                permutations[f"{path}.{name}"] = (order, dim)
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


def _shard_parameters(placements: dict[str, Placement], name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(
            param_name,
            nn.Parameter(distribute_tensor(param, mesh, [placements[param_name]]), requires_grad=param.requires_grad),
        )


class TransposedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear stored (in, out), GPT-2's `Conv1D`: weight split along dim 1."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        shard = partial(_shard_parameters, {"weight": Shard(1), "bias": Shard(0)})
        return distribute_module(
            module,
            device_mesh,
            shard,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class TransposedRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a Linear stored (in, out): weight split along dim 0, bias whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module,
            device_mesh,
            partial(_shard_parameters, {"weight": Shard(0), "bias": Replicate()}),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def _prepare_input(site: TPSite, layout: Placement, desired: Placement, use_local_output: bool) -> PrepareModuleInput:
    """PrepareModuleInput for the one argument `site.input_key` names (a position or a keyword)."""
    if isinstance(site.input_key, str):
        return PrepareModuleInput(
            input_kwarg_layouts={site.input_key: layout},
            desired_input_kwarg_layouts={site.input_key: desired},
            use_local_output=use_local_output,
        )
    assert isinstance(site.input_key, int)  # layout styles name their argument
    count = max(site.num_positional or 1, site.input_key + 1)
    layouts = tuple(layout if i == site.input_key else None for i in range(count))
    wanted = tuple(desired if i == site.input_key else None for i in range(count))
    return PrepareModuleInput(input_layouts=layouts, desired_input_layouts=wanted, use_local_output=use_local_output)


def _torch_styles(module: nn.Module, styles: dict[str, TPSite], sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Plan styles -> torch parallel styles, with the layouts sequence parallelism needs.

    With sequence parallelism the residual stream is split along the sequence (dim 1) from
    the `sequence_parallel_entry` layer on: rowwise outputs reduce-scatter to Shard(1),
    position-wise modules run on Shard(1), and colwise inputs are all-gathered, once per
    group on a `colwise_input` parent, or by each colwise Linear itself.
    """
    sequence_parallel = sequence_parallel and any(s.style in SEQUENCE_PARALLEL_STYLES for s in styles.values())
    stream = Shard(1) if sequence_parallel else Replicate()
    # The exit gathers the stream again: the head after it reads the whole sequence.
    head_input = Replicate() if any(s.style == "sequence_parallel_exit" for s in styles.values()) else stream
    torch_styles: dict[str, ParallelStyle] = {}
    for path, site in styles.items():
        plain_linear = isinstance(module.get_submodule(path), (nn.Linear, nn.Embedding))
        colwise, rowwise = (
            (ColwiseParallel, RowwiseParallel)
            if plain_linear
            else (TransposedColwiseParallel, TransposedRowwiseParallel)
        )
        if site.style == "colwise":  # its parent's colwise_input, if any, replicated the input already
            prepared = styles.get(_parent(path), site).style == "colwise_input"
            torch_styles[path] = colwise(input_layouts=Replicate() if prepared else stream)
        elif site.style == "rowwise":
            torch_styles[path] = rowwise(output_layouts=stream)
        elif site.style == "vocab_embedding":
            torch_styles[path] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif site.style == "vocab_output":
            torch_styles[path] = colwise(input_layouts=head_input, output_layouts=Replicate())
        elif site.style == "colwise_input":
            torch_styles[path] = _prepare_input(site, stream, Replicate(), use_local_output=False)
        elif sequence_parallel and site.style == "sequence_parallel":
            torch_styles[path] = SequenceParallel(use_local_output=True)  # the residual stream stays local
        elif sequence_parallel and site.style == "sequence_parallel_entry":
            # The whole stream enters; each rank keeps its shard of the sequence (no communication).
            torch_styles[path] = _prepare_input(site, Replicate(), Shard(1), use_local_output=True)
        elif sequence_parallel and site.style == "sequence_parallel_exit":
            count = site.num_positional or 1
            torch_styles[path] = PrepareModuleOutput(
                output_layouts=tuple(Shard(1) if i == site.input_key else None for i in range(count)),
                desired_output_layouts=tuple(Replicate() for _ in range(count)),
                use_local_output=True,
            )
    return torch_styles


def apply_tensor_parallel(
    module: nn.Module,
    tp_mesh: DeviceMesh,
    styles: dict[str, TPSite],
    divide_attrs: dict[str, int],
    sequence_parallel: bool,
) -> None:
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
    parallelize_module(module, tp_mesh, _torch_styles(module, in_model_order, sequence_parallel))
    _retie(module, ties)


def _tied_parameter_names(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (named_parameters lists only the first)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, ties: list[list[str]]) -> None:
    """`distribute_module` replaces each module's parameters separately: point every name
    of a tied group back at one parameter, the split (DTensor) one when only some of the
    names belong to split modules (BERT's `cls.predictions.bias` is the decoder's bias)."""

    def get(name: str) -> nn.Parameter:
        path, _, attr = name.rpartition(".")
        return getattr(module.get_submodule(path), attr)

    for names in ties:
        split = [name for name in names if isinstance(get(name), DTensor)]
        owner = split[0] if split else names[0]
        shared = get(owner)
        for name in names:
            other = get(name)
            if name in split:
                assert isinstance(other, DTensor) and isinstance(shared, DTensor)  # so the owner is split too
                if other.shape != shared.shape or other.placements != shared.placements:
                    raise ValueError(f"tied parameters {owner} and {name} are split differently by the plan")
            path, _, attr = name.rpartition(".")
            setattr(module.get_submodule(path), attr, shared)


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict with its ORIGINAL keys and full plain tensors, on every rank.

    Gathers DTensor shards (tensor and/or data parallel) and undoes fused-row
    permutations. A collective: every rank of the module's mesh must call it.
    """
    # our models' state: parameters and buffers (torch annotates any state_dict value)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)))
    for name, (order, dim) in getattr(module, FUSED_PERMUTATIONS_ATTR, {}).items():
        if name in state:
            state[name] = state[name].index_select(dim, torch.argsort(order).to(state[name].device))
    return state
