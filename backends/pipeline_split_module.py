"""Split by module: each pipeline stage a skeleton copy of the model that runs the model's own
forward (what `pipeline_split.split_model` falls back to).

When torch.fx cannot trace forward (Hugging Face Transformers models: "co_varnames is too
small"), the model is split in the spirit of torchtitan's split, where each stage keeps
its own slice of the layers. Stage k is a copy of the model's skeleton that holds its
own layers and runs the model's own forward:

* a layer with parameters that another stage runs is a `_StubLayer` returning zeros
  shaped like its output on one micro-batch (the glue between layers reads only shapes
  of what stubs return; checked below), except the last layer of stage k - 1, whose
  stub returns the activation stage k received;
* parameter-free layers of earlier stages (rotary embeddings computing cos/sin,
  dropout) run again in every stage;
* a stage but the last stops right after its last layer (a forward hook raises
  `_StageOutput`) and returns that layer's output tensors followed by the model's
  inputs, which every stage receives (its glue may read them: an attention mask); the
  last stage returns the tensors of the model's output, and `ModelSplit.model_output`
  rebuilds what forward returned (a ModelOutput included) for the loss function.

So a single tensor chain crosses each cut. Whether that is enough is checked on one
forward on fake tensors that records, op by op, which layers' outputs each value
depends on (through glue and parameter-free layers); a stage whose layers or output
would read any other earlier-stage output (an encoder's output read by decoder layers)
raises a ValueError naming the layers.
"""

from __future__ import annotations

import contextvars
import copy
import types
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

from autoplan.analysis.trace import as_exported


class _TensorMeta(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Template:
    """A value (a pytree: a tensor, a tuple, a Hugging Face ModelOutput, ...) with its tensors
    taken out, so that it can be rebuilt from tensors alone, which is all a pipeline stage
    sends and returns."""

    spec: TreeSpec
    leaves: tuple
    """_TensorMeta in place of each tensor leaf; other leaves (None, ints) as they were."""

    @staticmethod
    def of(value: Any) -> Template:
        leaves, spec = tree_flatten(value)
        return Template(
            spec,
            tuple(
                _TensorMeta(tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in leaves
            ),
        )

    @staticmethod
    def tensors(value: Any) -> tuple[torch.Tensor, ...]:
        return tuple(leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))

    @property
    def metas(self) -> list[_TensorMeta]:
        return [leaf for leaf in self.leaves if isinstance(leaf, _TensorMeta)]

    def rebuild(self, tensors) -> Any:
        tensors = iter(tensors)
        return tree_unflatten(
            [next(tensors) if isinstance(leaf, _TensorMeta) else leaf for leaf in self.leaves], self.spec
        )


class _StageRun(NamedTuple):
    """What the stubs of the stage module now running need to know."""

    batch_size: int | None
    device: torch.device
    received: Any
    """The previous stage's activation, rebuilt (None on the first stage)."""


_STAGE_RUN: contextvars.ContextVar[_StageRun] = contextvars.ContextVar("autoplan_pipeline_stage_run")


class _StubLayer(nn.Module):
    """Stands in for a layer another stage runs: returns the activation this stage received
    (`receives`: the last layer of the previous stage), else zeros shaped like the layer's
    output, dim 0 scaled from the traced batch to this micro-batch."""

    def __init__(self, output: Template | None, traced_batch_size: int | None, receives: bool):
        super().__init__()
        self.output, self.traced_batch_size, self.receives = output, traced_batch_size, receives

    def forward(self, *args, **kwargs) -> Any:
        run = _STAGE_RUN.get()
        if self.receives:
            return run.received

        def shape(meta: _TensorMeta) -> tuple[int, ...]:
            if run.batch_size is not None and meta.shape and meta.shape[0] == self.traced_batch_size:
                return (run.batch_size, *meta.shape[1:])
            return meta.shape

        assert self.output is not None  # None only for a layer the traced forward never called
        return self.output.rebuild(
            torch.zeros(shape(meta), dtype=meta.dtype, device=run.device) for meta in self.output.metas
        )

    def extra_repr(self) -> str:
        return "receives the previous stage's activation" if self.receives else "zeros shaped like the layer's output"


class _StageOutput(Exception):
    """Raised by the forward hook of a stage's last layer: carries that layer's output out of
    the model's forward, which the stage stops there."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output


def _stop_stage(module: nn.Module, args: tuple, output: Any) -> None:
    raise _StageOutput(output)


@dataclass(frozen=True)
class _StageSpec:
    index: int
    received: Template | None
    """The output of the previous stage's last layer (None on the first stage)."""
    last_layer: str | None
    """The layer after which this stage returns; None on the last stage (it runs to the end)."""


def _run_stage(self: nn.Module, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """forward of a stage split by module: (received tensors..., model inputs...) ->
    (tensors of its last layer's output..., model inputs...), or on the last stage the
    tensors of the model's output."""
    spec = cast(_StageSpec, self._pipeline_stage)
    num_received = len(spec.received.metas) if spec.received is not None else 0
    received = spec.received.rebuild(args[:num_received]) if spec.received is not None else None
    inputs = args[num_received:]
    run = _StageRun(inputs[0].shape[0] if inputs else None, args[0].device, received)
    token = _STAGE_RUN.set(run)
    # Registered per call on whatever module sits at the path now (a checkpoint wrapper after
    # recompute), so it fires once, after the layer, and never during recomputation.
    stop = self.get_submodule(spec.last_layer).register_forward_hook(_stop_stage) if spec.last_layer else None
    try:
        output = type(self).forward(self, *inputs)  # the model's own forward
    except _StageOutput as stopped:
        return Template.tensors(stopped.output) + tuple(inputs)
    finally:
        if stop is not None:
            stop.remove()
        _STAGE_RUN.reset(token)
    assert spec.last_layer is None, f"stage {spec.index} ran past its last layer {spec.last_layer!r}"
    return Template.tensors(output)


@dataclass
class _LayerRecord:
    has_parameters: bool
    output: Template | None = None
    """Its output on the first call (None: never called)."""
    num_calls: int = 0
    reads: set[str] = field(default_factory=set)
    """Layers whose outputs the values it is called with depend on."""
    derives: set[str] = field(default_factory=set)
    """Layers whose outputs its own output depends on (what a parameter-free layer passes on)."""


@dataclass
class _ForwardRecord:
    layers: dict[str, _LayerRecord]
    call_order: list[str]
    output: Template
    output_reads: set[str]
    """Layers whose outputs the model's output depends on."""


_SHAPE_ONLY = frozenset(
    {
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.Tensor.new_zeros,
        torch.Tensor.new_ones,
        torch.Tensor.new_empty,
        torch.Tensor.new_full,
    }
)
"""Functions whose tensor output depends on their tensor inputs' shapes only."""


class _LayerDataflow(TorchFunctionMode):
    """Which layers' outputs each tensor's value depends on, propagated through every torch
    call (shape reads carry nothing: `torch.arange(x.shape[1])` depends on no layer)."""

    def __init__(self):
        super().__init__()
        self._sources: dict[int, frozenset[str]] = {}
        self._alive: list[torch.Tensor] = []  # ids stay unique while the record lives

    def of(self, value: Any) -> set[str]:
        return {
            source
            for leaf in tree_leaves(value)
            if isinstance(leaf, torch.Tensor)
            for source in self._sources.get(id(leaf), ())
        }

    def mark(self, value: Any, sources: set[str]) -> None:
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                self._sources[id(leaf)] = frozenset(sources)
                self._alive.append(leaf)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        sources = set() if func in _SHAPE_ONLY else self.of((args, kwargs))
        if sources:
            self.mark(output, sources | self.of(output))
            if getattr(func, "__name__", "") == "__setitem__":  # x[i] = y: x now depends on y
                self.mark(args[0], sources)
        return output


def _record_forward(model: nn.Module, layer_names: set[str], example_inputs: tuple) -> _ForwardRecord:
    """One forward on fake tensors (no memory, no compute; the model's parameters stay as they
    are) recording, per layer, its output structure and the layers it reads."""
    records = {name: _LayerRecord(any(True for _ in model.get_submodule(name).parameters())) for name in layer_names}
    order: dict[str, None] = {}
    dataflow = _LayerDataflow()

    def before(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        records[name].reads |= dataflow.of((args, kwargs))
        order.setdefault(name)

    def after(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        record = records[name]
        record.num_calls += 1
        record.derives |= dataflow.of(output)
        record.output = record.output or Template.of(output)
        dataflow.mark(output, {name})

    handles = []
    for name in layer_names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda *a, name=name: before(name, *a), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda *a, name=name: after(name, *a)))
    device = next((p.device for p in model.parameters()), example_inputs[0].device if example_inputs else "cpu")
    try:
        # as_exported: Hugging Face takes its traceable paths, as in `_stage_io_examples`
        with FakeTensorMode(allow_non_fake_inputs=True), as_exported(), torch.no_grad():
            inputs = tuple(torch.empty_like(x, device=device) for x in example_inputs)
            with dataflow:
                output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return _ForwardRecord(records, list(order), Template.of(output), dataflow.of(output))


def _unmet_reads(
    forward: _ForwardRecord, stage_of: dict[str, int], stage: int, received: str | None, wanted: dict[str, set[str]]
) -> dict[str, list[str]]:
    """For each reader in `wanted` (reader -> layers it reads), the layers among those (and
    what parameter-free ones derive from) whose outputs `stage` can neither compute nor
    receive: earlier stages' layers with parameters other than `received`. Parameter-free
    layers run again in every stage. Readers with nothing unmet are left out."""

    def unmet(names: set[str]) -> set[str]:
        found, seen, pending = set(), set(), list(names)
        while pending:
            name = pending.pop()
            if name in seen or name == received:
                continue
            seen.add(name)
            record = forward.layers[name]
            if not record.has_parameters:
                pending.extend(record.derives)
            elif stage_of[name] < stage:
                found.add(name)
        return found

    return {reader: sorted(unmet(names)) for reader, names in wanted.items() if unmet(names)}


def _choose_cuts(forward: _ForwardRecord, stage_layers: list[list[str]], reason: str) -> list[str]:
    """cuts[k]: the layer of stage k whose output is the one activation sent to stage k + 1,
    the last (in call order) that leaves stage k + 1 nothing else to read from earlier stages."""
    stage_of = {name: index for index, names in enumerate(stage_layers) for name in names}
    never_called = sorted(name for name, record in forward.layers.items() if record.output is None)
    if never_called:
        raise ValueError(f"plan layers {never_called} are never called by forward, so they cannot mark stage cuts")
    for earlier, later in zip(forward.call_order, forward.call_order[1:]):
        if stage_of[later] < stage_of[earlier]:
            raise ValueError(
                f"layer {later!r} is planned on stage {stage_of[later]} but runs after layer "
                f"{earlier!r} of stage {stage_of[earlier]}: stages must follow execution order"
            )
    cuts: list[str] = []
    for stage in range(1, len(stage_layers)):
        wanted = {
            f"layer {name!r}": forward.layers[name].reads
            for name in stage_layers[stage]
            if forward.layers[name].has_parameters
        }
        if stage == len(stage_layers) - 1:
            wanted["the model's output"] = forward.output_reads
        called = [name for name in forward.call_order if stage_of[name] == stage - 1]
        # a candidate is called once and leaves only parameter-free layers of its stage after it
        # (they run again later)
        candidates = [
            name
            for index, name in enumerate(called)
            if forward.layers[name].num_calls == 1
            and not any(forward.layers[after].has_parameters for after in called[index + 1 :])
        ]
        if not called:
            raise ValueError(f"pipeline stage {stage - 1} has no layers")
        if not candidates:
            last = next((name for name in reversed(called) if forward.layers[name].has_parameters), called[-1])
            raise ValueError(
                f"cannot end pipeline stage {stage - 1} after its last layer {last!r}: {reason}, and "
                f"splitting by module cuts after a layer called once, but forward calls {last!r} "
                f"{forward.layers[last].num_calls} times"
            )
        cut = next(
            (
                candidate
                for candidate in reversed(candidates)
                if not _unmet_reads(forward, stage_of, stage, candidate, wanted)
            ),
            None,
        )
        if cut is None:
            needs = "; ".join(
                f"{reader} reads {names}"
                for reader, names in _unmet_reads(forward, stage_of, stage, candidates[-1], wanted).items()
            )
            raise ValueError(
                f"cannot cut {stage_layers[stage - 1][-1]!r} | {stage_layers[stage][0]!r} into pipeline "
                f"stages {stage - 1} | {stage}: {reason}, and splitting by module passes only the "
                f"output of layer {candidates[-1]!r} from stage {stage - 1} to stage {stage}, but on "
                f"stage {stage} {needs} (outputs of earlier stages' layers); move the cut so that one "
                f"tensor chain crosses it"
            )
        cuts.append(cut)
    for stage, cut in enumerate(cuts):  # a parameter-free cut layer sends what it derives
        unmet_sent = _unmet_reads(forward, stage_of, stage, cuts[stage - 1] if stage else None, {cut: {cut}})
        if unmet_sent:
            raise ValueError(
                f"cannot split into pipeline stages by module ({reason}): layer {cut!r}, whose output "
                f"stage {stage} sends, derives from {unmet_sent[cut]} of earlier stages"
            )
    return cuts


def _stage_skeleton(
    model: nn.Module,
    forward: _ForwardRecord,
    stage_of: dict[str, int],
    stage: int,
    cuts: list[str],
    traced_batch_size: int | None,
) -> nn.Module:
    """Stage `stage`: a copy of `model` sharing the layers it runs (and any parameter outside
    every layer) with the model, stubs for the rest, forward replaced by `_run_stage`."""
    received = cuts[stage - 1] if stage else None
    memo: dict[int, Any] = {}
    for name, record in forward.layers.items():
        module = model.get_submodule(name)
        runs_here = stage_of[name] == stage or (stage_of[name] < stage and not record.has_parameters)
        memo[id(module)] = (
            module
            if runs_here and name != received
            else _StubLayer(record.output, traced_batch_size, receives=name == received)
        )
    for name, parameter in model.named_parameters():
        if not any(name.startswith(layer + ".") for layer in forward.layers):
            memo[id(parameter)] = parameter
    skeleton = copy.deepcopy(model, memo)
    spec = _StageSpec(
        stage, forward.layers[received].output if received else None, cuts[stage] if stage < len(cuts) else None
    )
    # torch annotates Module.__setattr__ for tensors and modules only; any value is stored
    skeleton._pipeline_stage = spec  # type: ignore[assignment]
    skeleton.forward = types.MethodType(_run_stage, skeleton)
    return skeleton


def split_by_module(
    model: nn.Module, stage_layers: list[list[str]], example_inputs: tuple, reason: str
) -> tuple[list[nn.Module], Template]:
    """The stage skeletons and the template of the model's output (see the module docstring)."""
    stage_of = {name: index for index, names in enumerate(stage_layers) for name in names}
    planned: dict[int, str] = {}
    for name, stage in stage_of.items():  # one module under two names (T5's shared embedding)
        other = planned.setdefault(id(model.get_submodule(name)), name)
        if stage_of[other] != stage:
            raise ValueError(
                f"layers {other!r} and {name!r} are one module, planned on stages {stage_of[other]} "
                f"and {stage}: {reason}, and splitting by module needs one module on one stage"
            )
    forward = _record_forward(model, set(stage_of), example_inputs)
    cuts = _choose_cuts(forward, stage_layers, reason)
    traced_batch_size = example_inputs[0].shape[0] if example_inputs and example_inputs[0].dim() else None
    modules = [
        _stage_skeleton(model, forward, stage_of, stage, cuts, traced_batch_size) for stage in range(len(stage_layers))
    ]
    return modules, forward.output
