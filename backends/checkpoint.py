"""Checkpoints of a ParallelModel with `torch.distributed.checkpoint` (DCP), loadable into any plan.

    >>> path = pm.save("ckpt/step-000010", optimizer=opt, step=10)     # doctest: +SKIP
    >>> step = other_pm.load(latest_checkpoint("ckpt"), optimizer=other_opt)  # another plan / world  # doctest: +SKIP
    >>> pm.load_pretrained("llama-tiny/")          # a Hugging Face `save_pretrained` folder  # doctest: +SKIP

State comes from `torch.distributed.checkpoint.state_dict.get_state_dict` (model and, with the
optimizer flattened to "state.<fqn>.<name>" / "param_groups.<fqn>.<key>", the optimizer) and
goes back through `set_state_dict`; `dcp.save` / `dcp.load` write and read it, each rank
only its own shards, resharded by DCP for whatever plan loads it. Keys are the ORIGINAL
model's names (FQNs), so a checkpoint does not depend on the plan that wrote it:

- pp > 1: each rank holds several stage modules (`pm.engine.stage_modules`); they are viewed
  as one `nn.ModuleList`, whose "<index>." prefix is dropped, as are wrapper path components
  (`_checkpoint_wrapped_module.`, `pipeline_split.original_fqn`);
- a fused q|k|v Linear split by tensor parallelism has its rows permuted
  (`tensor_parallel.fused_row_permutation`): its parameter and optimizer state are saved
  whole in the model's own row order (gathered: a transient full copy of that one tensor)
  and permuted and re-split on load;
- every name of a tied group (`plan.tied_parameters`, e.g. tok_emb.weight = lm_head.weight)
  is written, for the model and its optimizer state, so that a pipeline stage holding only
  one of the copies finds its name; a Hugging Face folder that stores only one of them
  (`tie_word_embeddings`) serves the other names from it.

A checkpoint is a folder:

    step-000010/
        .metadata, __0_0.distcp, ...   DCP's own files ("model.<fqn>", "optim.<key>")
        autoplan.json                  step, model name and fingerprint, the plan's mesh
        COMPLETE                       written last: the checkpoint is whole

A save writes into "<name>.tmp" and rank 0 renames it once every rank has written and the
marker is in: an interrupted save leaves the ".tmp" folder, which `latest_checkpoint` and
`load` ignore or refuse, and every earlier checkpoint as it was. Before `dcp.load` touches
anything, `load` checks that the folder is whole and that it holds this model's names and
shapes (the first mismatching key is named), on every rank alike, so no rank hangs alone.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from autoplan.backends.pipeline_split import original_fqn
from autoplan.backends.tensor_parallel import FUSED_PERMUTATIONS_ATTR
from autoplan.errors import AutoplanError
from autoplan.schema.plan import Plan

COMPLETE_MARKER = "COMPLETE"
"""File a save writes last into its folder: without it the checkpoint is partial."""
METADATA_FILE = "autoplan.json"
"""The step, model name and fingerprint, and the plan's mesh, next to DCP's files."""
STEP_NAME = re.compile(r"step-(\d+)")
"""Folder names `latest_checkpoint` considers: "step-000010" (see `checkpoint_path`)."""
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimizer state keyed per parameter FQN, so it reshards across pipeline ranks too."""


class ParallelModel(Protocol):
    """What a checkpoint reads of `autoplan.backends.runner.ParallelModel` (which calls into
    this file, so it is not imported here)."""

    module: nn.Module
    plan: Plan
    engine: Any
    """The pipeline engine when pp > 1 (its `stage_modules`), else None."""
    device: torch.device


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` goes under `directory`.

    >>> checkpoint_path("runs/a", 10).as_posix()
    'runs/a/step-000010'
    """
    return Path(directory) / f"step-{step:06d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint "step-N" under `directory`; None when there is none.
    Folders of interrupted saves (no COMPLETE marker, or still named "step-N.tmp") are skipped.

    >>> latest_checkpoint("/nonexistent") is None
    True
    """
    folder = Path(directory)
    if not folder.is_dir():
        return None
    complete = [
        (int(match[1]), path)
        for path in folder.iterdir()
        if (match := STEP_NAME.fullmatch(path.name)) and (path / COMPLETE_MARKER).is_file()
    ]
    return max(complete)[1] if complete else None


@dataclass
class _LocalState:
    """This rank's state as DSD gives it (`root`'s keys) and the same values under the
    original model's names: `model[name]`, `optim["state.<name>.exp_avg"]`, ..."""

    root: nn.Module
    model: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    model_keys: list[tuple[str, str]] = field(default_factory=list)
    """(root key, original name) of every model entry; several root keys may share a name."""
    optim_keys: list[tuple[str, str]] = field(default_factory=list)
    permutations: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    """Original name -> (row permutation, dim) of the fused Linears tensor parallel permuted."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """State no pipeline stage holds (`ModelSplit.unreached_state`): saved and loaded as is."""


def _stage_roots(pm: ParallelModel) -> tuple[nn.Module, list[nn.Module], int]:
    """The module DSD reads (the model, or the stages as one ModuleList), the modules that
    carry fused-row permutations, and how many leading key components to drop."""
    if pm.engine is None:
        return pm.module, [pm.module], 0
    stages = list(pm.engine.stage_modules)
    return nn.ModuleList(stages), stages, 1


def _original(key: str, drop: int) -> str:
    return original_fqn(key.split(".", drop)[-1] if drop else key)


def _split_optim_key(key: str, fqns: set[str]) -> tuple[str, str, str]:
    """("state", "blocks.0.ln_1.weight", "exp_avg") from "state.blocks.0.ln_1.weight.exp_avg"."""
    section, _, rest = key.partition(".")
    parts = rest.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:cut]) in fqns:
            return section, ".".join(parts[:cut]), ".".join(parts[cut:])
    raise AssertionError(f"optimizer key {key!r} names no parameter of the model")


def _local_state(pm: ParallelModel, optimizer: torch.optim.Optimizer | None) -> _LocalState:
    """This rank's model and optimizer state from DSD, keyed by the original names."""
    root, carriers, drop = _stage_roots(pm)
    model_sd: dict[str, Any]
    optim_sd: dict[str, Any] = {}  # flattened (OPTIONS): "state.<fqn>.<name>" -> value
    if optimizer is None:
        model_sd = get_model_state_dict(root, options=OPTIONS)
    else:
        model_sd, optim_sd = cast(
            tuple[dict[str, Any], dict[str, Any]], get_state_dict(root, optimizer, options=OPTIONS)
        )
    state = _LocalState(root)
    for key, value in model_sd.items():
        state.model_keys.append((key, _original(key, drop)))
        state.model.setdefault(_original(key, drop), value)
    fqns = set(model_sd)
    for key, value in optim_sd.items():
        section, fqn, tail = _split_optim_key(key, fqns)
        name = f"{section}.{_original(fqn, drop)}.{tail}"
        state.optim_keys.append((key, name))
        state.optim.setdefault(name, value)
    for module in carriers:
        for name, permutation in getattr(module, FUSED_PERMUTATIONS_ATTR, {}).items():
            state.permutations[original_fqn(name)] = permutation
    if pm.engine is not None:
        state.extra = dict(pm.engine._unreached_state)  # held by pp rank 0 only (build_pipeline)
    return state


def _entries(state: _LocalState) -> dict[str, Any]:
    """The flat dict a checkpoint holds: "model.<name>" and "optim.<key>" (this rank's part)."""
    model = {**state.extra, **state.model}
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"optim.{k}": v for k, v in state.optim.items()}}


def _permuted_keys(state: _LocalState) -> dict[str, tuple[torch.Tensor, int]]:
    """Entry key -> (permutation, dim) of everything laid out in a fused Linear's permuted
    rows: the parameter and its optimizer state of its shape (Adam's moments, not its step)."""
    result = {}
    for name, permutation in state.permutations.items():
        if name not in state.model:
            continue
        result[f"model.{name}"] = permutation
        for key, value in state.optim.items():
            if key.startswith(f"state.{name}.") and getattr(value, "shape", None) == state.model[name].shape:
                result[f"optim.{key}"] = permutation
    return result


def _alias_tied_names(state: _LocalState, tied_groups: list[list[str]]) -> None:
    """Add every missing name of a tied group, model and optimizer entries, as the held one."""
    for group in tied_groups:
        held = next((name for name in group if name in state.model), None)
        if held is None:
            continue
        for name in group:
            state.model.setdefault(name, state.model[held])
            for key in list(state.optim):
                section, rest = key.split(".", 1)
                if rest.startswith(held + "."):
                    state.optim.setdefault(f"{section}.{name}.{rest[len(held) + 1 :]}", state.optim[key])


def _saved_entries(pm: ParallelModel, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The flat dict `dcp.save` writes (`_entries`), fused Linears in the model's row order."""
    state = _local_state(pm, optimizer)
    _alias_tied_names(state, pm.plan.tied_parameters)
    entries = _entries(state)
    for key, (order, dim) in _permuted_keys(state).items():
        value = entries[key]
        whole = value.full_tensor() if isinstance(value, DTensor) else value  # collective over its mesh
        entries[key] = whole.index_select(dim, torch.argsort(order).to(whole.device))
    return entries


def save_checkpoint(
    pm: ParallelModel, path: str | Path, optimizer: torch.optim.Optimizer | None = None, step: int = 0
) -> Path:
    """Write `pm`'s model (and `optimizer`'s) state to the folder `path` with `dcp.save`,
    atomically; a collective: every rank calls it. Returns `path`.

    >>> save_checkpoint(pm, checkpoint_path("ckpt", 10), optimizer, step=10)   # doctest: +SKIP
    """
    path = Path(path)
    staging = path.with_name(path.name + ".tmp")
    is_writer = dist.get_rank() == 0
    if is_writer:
        if staging.exists():  # left by an interrupted save
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(_saved_entries(pm, optimizer), checkpoint_id=staging)  # returns once .metadata is written
    if is_writer:
        info = {
            "step": step,
            "model_name": pm.plan.model_name,
            "model_fingerprint": pm.plan.model_fingerprint,
            "mesh": pm.plan.mesh,
            "world_size": dist.get_world_size(),
            "optimizer": optimizer is not None,
        }
        (staging / METADATA_FILE).write_text(json.dumps(info, indent=1) + "\n")
        (staging / COMPLETE_MARKER).write_text(f"step {step}\n")
        _replace_folder(staging, path)
    dist.barrier()
    return path


def _replace_folder(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`; a checkpoint already there is moved aside, then deleted."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    staging.rename(path)
    if old.exists():
        shutil.rmtree(old)


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face `save_pretrained` folder: safetensors files and no DCP metadata."""
    return not (path / ".metadata").exists() and any(path.glob("*.safetensors"))


def _checked_folder(path: Path) -> tuple[Metadata, dict[str, Any]]:
    """DCP's metadata and autoplan.json of a whole checkpoint; AutoplanError naming what is missing."""
    if not path.is_dir():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir() if STEP_NAME.fullmatch(p.name)) if parent.is_dir() else []
        hint = f"{parent} holds {', '.join(found)}" if found else f"{parent} holds no step-N checkpoint"
        raise AutoplanError(f"checkpoint {path}: no such directory ({hint})")
    if not (path / COMPLETE_MARKER).is_file():
        raise AutoplanError(
            f"checkpoint {path} is partial: {COMPLETE_MARKER} is missing (an interrupted save); "
            f"load latest_checkpoint({str(path.parent)!r}) instead"
        )
    for name in (".metadata", METADATA_FILE):
        if not (path / name).is_file():
            raise AutoplanError(f"checkpoint {path} is partial: {name} is missing")
    metadata = FileSystemReader(path).read_metadata()
    files = sorted({info.relative_path for info in cast(dict, metadata.storage_data).values()})
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise AutoplanError(f"checkpoint {path} is partial: {', '.join(missing)} missing (of {len(files)} data files)")
    return metadata, json.loads((path / METADATA_FILE).read_text())


def _tensor_shapes(metadata: Metadata, prefix: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint under `prefix` ("model." or "")."""
    return {
        key[len(prefix) :]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def _model_shapes(state: _LocalState) -> dict[str, tuple[int, ...]]:
    """Name -> full shape of every model tensor, over all ranks (each pipeline rank holds some)."""
    local = {
        name: tuple(value.shape)
        for name, value in {**state.extra, **state.model}.items()
        if isinstance(value, torch.Tensor)
    }
    gathered: list[dict[str, tuple[int, ...]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {name: shape for part in gathered if part for name, shape in part.items()}


def _first_mismatch(
    model: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], tied_groups: list[list[str]]
) -> str | None:
    """The first key (sorted) whose presence or shape differs, in words; None when all agree.
    A model name missing from the checkpoint is fine when a tied partner of its shape is there."""
    partners = {name: group for group in tied_groups for name in group}
    for name in sorted(set(model) | set(saved)):
        if name not in model:
            return f"{name!r} (shape {list(saved[name])}) is in the checkpoint but not in the model"
        if name not in saved:
            if any(saved.get(partner) == model[name] for partner in partners.get(name, [])):
                continue
            return f"{name!r} (shape {list(model[name])}) is in the model but not in the checkpoint"
        if model[name] != saved[name]:
            return f"{name!r} has shape {list(saved[name])} in the checkpoint but {list(model[name])} in the model"
    return None


def _raise_on_every_rank(message: str | None) -> None:
    """Raise AutoplanError on all ranks when any rank has a message (the lowest rank's)."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((text for text in messages if text), None)
    if first:
        raise AutoplanError(first)


def _stored_key(key: str, saved: set[str], partners: dict[str, list[str]], prefix: str) -> str:
    """The checkpoint key an entry is read from: "model.<name>" becomes prefix + name, or a
    tied partner's name when only that one is stored (a Hugging Face folder's tied head)."""
    if not key.startswith("model."):
        return key
    name = key[len("model.") :]
    stored = [partner for partner in partners.get(name, []) if partner in saved]
    return prefix + (name if name in saved or not stored else stored[0])


def _check_model(pm: ParallelModel, saved_shapes: dict[str, tuple[int, ...]], label: str) -> None:
    """AutoplanError on every rank, before anything is read, when the checkpoint's model
    names or shapes are not this model's; looks at the model only (the optimizer stays fresh)."""
    mismatch = _first_mismatch(_model_shapes(_local_state(pm, None)), saved_shapes, pm.plan.tied_parameters)
    if mismatch:
        raise AutoplanError(f"{label} is of another model: {mismatch}; load a checkpoint saved from this model")


def _read(
    pm: ParallelModel, state: _LocalState, reader: Any, prefix: str, metadata: Metadata, label: str
) -> dict[str, Any]:
    """`dcp.load` this rank's entries (the model's under `prefix`: "model." or "" for a
    Hugging Face folder) once every rank finds them all in the checkpoint; returns them
    loaded, by `_entries` key, fused Linears whole in the model's row order."""
    saved_shapes = _tensor_shapes(metadata, prefix)
    partners = {name: group for group in pm.plan.tied_parameters for name in group}
    stored = {key: _stored_key(key, set(saved_shapes), partners, prefix) for key in _entries(state)}
    permuted = _permuted_keys(state)
    request: dict[str, Any] = {}
    for key, value in _entries(state).items():
        if key in permuted:  # read whole; `_apply` permutes and splits it
            value = torch.empty(value.shape, dtype=value.dtype, device=pm.device)
        request.setdefault(stored[key], value)
    missing = sorted(key for key in request if key not in metadata.state_dict_metadata)
    more = f" and {len(missing) - 1} more entries" if len(missing) > 1 else ""
    _raise_on_every_rank(
        f"{label} lacks {missing[0]!r}{more} that this optimizer needs: it was saved with another kind "
        "of optimizer; load it with the same kind, or with optimizer=None"
        if missing
        else None
    )
    dcp.load(request, storage_reader=reader)
    return {key: request[stored[key]] for key in stored}


def _apply(state: _LocalState, loaded: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
    """Put loaded entries back into the model and optimizer through `set_state_dict`, fused
    Linears' rows permuted and split like the parameters they go into."""
    current = _entries(state)
    for key, (order, dim) in _permuted_keys(state).items():
        rows = loaded[key].index_select(dim, order.to(loaded[key].device))
        target = current[key]
        loaded[key] = (
            distribute_tensor(rows, target.device_mesh, target.placements, src_data_rank=None)
            if isinstance(target, DTensor)
            else rows
        )
    model_sd = {key: loaded[f"model.{name}"] for key, name in state.model_keys}
    if optimizer is None:
        set_model_state_dict(state.root, model_sd, options=OPTIONS)
        return
    optim_sd: dict[str, Any] = {}
    seen: set[str] = set()
    for key, name in state.optim_keys:  # two local stages holding one name get their own state
        value = loaded[f"optim.{name}"]
        optim_sd[key] = value.clone() if name in seen and isinstance(value, torch.Tensor) else value
        seen.add(name)
    set_state_dict(state.root, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)


def load_checkpoint(pm: ParallelModel, path: str | Path | None, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a checkpoint written by `save_checkpoint` under ANY plan and world size into `pm`
    (and `optimizer`); returns its step. A Hugging Face folder goes to `load_pretrained` (step 0).
    A collective: every rank calls it.

    >>> step = load_checkpoint(pm, latest_checkpoint("ckpt"), optimizer)   # doctest: +SKIP
    """
    if path is None:
        raise AutoplanError("checkpoint path is None: latest_checkpoint found no complete step-N folder")
    path = Path(path)
    if path.is_dir() and _is_hf_folder(path):
        if optimizer is not None:
            raise AutoplanError(f"{path} is a Hugging Face folder: it holds no optimizer state; pass optimizer=None")
        load_pretrained(pm, path)
        return 0
    metadata, info = _checked_folder(path)
    if optimizer is not None and not info.get("optimizer"):
        raise AutoplanError(f"checkpoint {path} was saved without optimizer state; load it with optimizer=None")
    label = f"checkpoint {path}"
    _check_model(pm, _tensor_shapes(metadata, "model."), label)
    state = _local_state(pm, optimizer)
    _apply(state, _read(pm, state, FileSystemReader(path), "model.", metadata, label), optimizer)
    return int(info["step"])


def load_pretrained(pm: ParallelModel, folder: str | Path) -> None:
    """Load the weights of a Hugging Face `save_pretrained` folder (safetensors) into `pm`,
    each rank reading only its shards, with torch's `HuggingFaceStorageReader`.

    >>> load_pretrained(pm, "llama-tiny/")   # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise AutoplanError(f"{folder}: no *.safetensors files (a Hugging Face save_pretrained folder holds them)")
    reader = HuggingFaceStorageReader(str(folder))
    metadata, label = reader.read_metadata(), f"Hugging Face folder {folder}"
    _check_model(pm, _tensor_shapes(metadata, ""), label)
    state = _local_state(pm, None)
    _apply(state, _read(pm, state, reader, "", metadata, label), None)
