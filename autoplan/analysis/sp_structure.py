"""Input layouts of tensor-parallel groups, and whether sequence parallelism can run, from dataflow.

    >>> from autoplan import zoo
    >>> from autoplan.analysis.trace import trace_model
    >>> job = zoo.build("llama-tiny", batch_size=1, device="meta")
    >>> sites = trace_model(job.module, job.example_inputs).tp_sites
    >>> sites["layers.0.attention"].style, sites["layers.0"].style
    ('colwise_input', 'sequence_parallel_entry')

`colwise_input`. A group of colwise Linears reading one tensor (q, k, v) is laid out once,
on the parent module's input, when that tensor is an argument of the parent (`input_key`:
its position, or its keyword: Hugging Face calls `self_attn(hidden_states=...)`) and nothing
else in the parent reads it. Otherwise each Linear lays out its own input: still right,
one collective per Linear instead of per group. Laying out the parent's input when
something else reads it (a block holding q, k, v and its own norm) would hand that reader
a DTensor.

Sequence parallelism splits the residual stream along the sequence (dim 1) from the first
layer holding a tensor-parallel region (the entry: its input is split there, with no
communication, `sequence_parallel_entry`) to the model's output. It can run only where every
op reading the split stream works on each position alone: position-wise modules (norms,
dropout, Linears), elementwise ops and reductions over other dims; colwise groups and the
vocab-split head all-gather the stream, rowwise Linears reduce-scatter back into it. An
attention that is not split (nn.MultiheadAttention outside a region), a reshape folding the
sequence into the batch (a mixture of experts router), or a split stream reaching the
model's output rule it out: then the model has no sequence-parallel sites, and the planner
never offers it (`check_sequence_parallel` says why).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from autoplan.analysis.graph import OpNode, TracedModel, _tensors
from autoplan.analysis.tp_structure import _RESHAPES, ELEMENTWISE_MODULES, ModelFlow, is_linear
from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES, TPSite

SEQ_DIM = 1
_SPLIT_STYLES = ("colwise", "rowwise", "vocab_output")
_KEEPS_SHAPE = {"to", "float", "half", "bfloat16", "type_as", "contiguous", "clone", "dropout", "detach"}
_REDUCTIONS = {"mean", "sum", "amax", "var", "std", "norm", "softmax", "log_softmax", "max", "min", "logsumexp"}


def _key_of(tensor: torch.Tensor | None, call: tuple[tuple, dict]) -> int | str | None:
    """Position or keyword of `tensor` among a call's arguments (None: not passed directly)."""
    args, kwargs = call
    for position, value in enumerate(args):
        if value is tensor:
            return position
    return next((name for name, value in kwargs.items() if value is tensor), None)


def add_colwise_input_sites(traced: TracedModel, flow: ModelFlow) -> None:
    """A `colwise_input` site on the parent of each colwise group whose input it receives whole."""
    done: dict[str, dict[str, TPSite]] = {}
    for layer in traced.layers:
        representative = traced.representative(layer)
        if representative not in done:
            done[representative] = {}
            for group in traced.tp[layer].colwise_groups:
                parents = {path.rpartition(".")[0] for path in group}
                if len(parents) != 1 or traced.tp[layer].sites[group[0]].style != "colwise":
                    continue
                parent = parents.pop()
                node = next(n for n in traced.graph if n.is_module and n.module == group[0] and n.layer == layer)
                tensor = node.inputs[0]
                call = traced.module_calls.get(parent, ((), {}))
                key = _key_of(tensor, call)
                readers = {user.module for user in flow.consumers.get(id(tensor), [])}
                if key is not None and readers <= set(group):
                    done[representative][parent] = TPSite(
                        style="colwise_input", input_key=key, num_positional=len(call[0])
                    )
        for path, site in done[representative].items():
            traced.tp[layer].sites[layer + path[len(representative) :]] = site


def _stream_of(call) -> torch.Tensor | None:
    """The (batch, sequence, ...) floating tensor a layer takes (its residual stream)."""
    return next((t for t in _tensors((call.args, call.kwargs)) if t.is_floating_point() and t.dim() >= 3), None)


def _replayed_outputs(traced: TracedModel, region: set[str]) -> dict[int, tuple[str, int]]:
    """id of each output of a replayed repeat in `region` -> (that layer, id of its twin's output).

    A replayed repeat records no nodes: its outputs are split where its twin's are, when its
    input is split too (T5's decoder replays the encoder's dropout on the whole decoder stream)."""
    return {
        id(t): (layer, id(twin_t))
        for layer in region
        if traced.representative(layer) != layer
        for t, twin_t in zip(
            _tensors(traced.calls[layer].output), _tensors(traced.calls[traced.representative(layer)].output)
        )
    }


def check_sequence_parallel(traced: TracedModel, flow: ModelFlow) -> tuple[tuple[str, str] | None, str | None]:
    """((entry layer, exit layer), None) when sequence parallelism can run, else (None, why not).

    The stream is split from the entry's input to the exit's output, where it is gathered
    again: the exit is the last layer holding a tensor-parallel region, so the glue and
    layers after it (a final norm, GPT-2's `hidden_states.view(output_shape)`, the head) see
    the whole sequence."""
    layers = [
        layer
        for layer in traced.layers
        if any(site.style in ("colwise", "rowwise") for site in traced.tp[layer].sites.values())
    ]
    if len(layers) < 2:
        return None, "fewer than two layers hold a tensor-parallel region"
    entry, exit_ = layers[0], layers[-1]
    call = traced.calls[entry]
    stream = _stream_of(call)
    if stream is None or _key_of(stream, (call.args, call.kwargs)) is None:
        return None, f"layer {entry!r} takes no (batch, sequence, ...) tensor argument to split"
    exit_output = traced.calls[exit_].output
    if not isinstance(exit_output, torch.Tensor) and not (
        isinstance(exit_output, tuple) and len(exit_output) > 1 and isinstance(exit_output[0], torch.Tensor)
    ):
        return None, f"layer {exit_!r} returns {type(exit_output).__name__}, not a tensor or a tuple led by one"
    styles = {path: site.style for layer_tp in traced.tp.values() for path, site in layer_tp.sites.items()}
    region = set(traced.layers[traced.layers.index(entry) : traced.layers.index(exit_) + 1])
    split = {id(stream)}
    replayed = _replayed_outputs(traced, region)
    gathered = {id(t) for t in _tensors(exit_output)}
    past_exit = False

    def is_split(t: torch.Tensor) -> bool:
        if past_exit and id(t) in gathered:
            return False
        if id(t) in split:
            return True
        layer, twin = replayed.get(id(t), (None, None))
        return (
            layer is not None
            and twin in split
            and any(is_split(x) for x in _tensors((traced.calls[layer].args, traced.calls[layer].kwargs)))
        )

    for node in traced.graph:
        in_region = node.layer in region or (node.layer is None and not past_exit)
        past_exit = (
            past_exit
            or (node.layer is not None and node.layer not in region and bool(split - {id(stream)}))
            or any(id(t) in gathered for t in node.inputs)
        )
        if node.layer is not None and not in_region and not past_exit:
            continue  # before the entry: the stream is whole
        reads = [t for t in node.inputs if is_split(t)]
        if past_exit:
            if reads:
                return None, f"a sequence-split tensor is read after the last split layer {exit_!r} (at {node.module})"
            continue
        split.update(id(t) for t in reads)
        if node.is_module and styles.get(node.module) in ("sequence_parallel", "colwise", "vocab_output") and not reads:
            return None, f"{node.module} reads the whole stream inside the split region"
        if (
            node.is_module
            and styles.get(node.module) == "colwise"
            and styles.get(node.module.rpartition(".")[0]) != "colwise_input"
        ):
            # its module would read the local shard's shape (`input_shape = x.shape[:-1]`)
            return None, (
                f"{node.module}'s input is read by its module too, which would see only a shard of the sequence"
            )
        if node.is_module and styles.get(node.module) == "rowwise":
            split.update(id(t) for t in node.outputs)  # reduce-scatter back into the stream
            continue
        why = _why_not_position_wise(node, reads, split, styles, flow) if reads else None
        if why:
            return None, f"{why} (at {node.module or '<root>'})"
    return (entry, exit_), None


def _why_not_position_wise(
    node: OpNode, reads: list[torch.Tensor], split: set[int], styles: Mapping[str, str], flow: ModelFlow
) -> str | None:
    """None when `node` keeps the sequence split (marking its outputs) or gathers it; else why not."""
    module = flow.modules[node.module] if node.is_module else None
    style = styles.get(node.module) if node.is_module else None
    if style in ("colwise", "vocab_output"):
        return None  # all-gathered for the group (or by the Linear itself)
    outputs = node.outputs
    if module is not None:
        if style == "sequence_parallel" or is_linear(module) or isinstance(module, ELEMENTWISE_MODULES):
            split.update(id(t) for t in outputs)
            return None
        return f"{type(module).__name__} reads the sequence-split stream"
    if len(outputs) != 1:
        return f"{node.target} of the sequence-split stream"
    out = outputs[0]
    if node.target in _REDUCTIONS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = {dim} if isinstance(dim, int) else set(dim or ())
        if not dims or any(d % reads[0].dim() == SEQ_DIM for d in dims):
            return f"{node.target} reduces over the sequence"
        split.add(id(out))
        return None
    if node.target in _KEEPS_SHAPE or (node.target not in _RESHAPES and _elementwise(node, out, split)):
        split.add(id(out))
        return None
    return f"{node.target} of the sequence-split stream"


def _elementwise(node: OpNode, out: torch.Tensor, split: set[int]) -> bool:
    """A broadcasting op whose other operands are split too or size 1 along the sequence."""
    inputs = node.inputs
    try:
        if torch.broadcast_shapes(*(t.shape for t in inputs)) != out.shape or out.dim() <= SEQ_DIM:
            return False
    except RuntimeError:
        return False
    for t in inputs:
        aligned = SEQ_DIM - (out.dim() - t.dim())
        if aligned >= 0 and t.shape[aligned] != 1 and id(t) not in split:
            return False
    return True


def apply_sequence_parallel(traced: TracedModel, flow: ModelFlow) -> None:
    """Keep the sequence-parallel sites of the split region and mark its entry and exit, or drop them all."""
    region, why = check_sequence_parallel(traced, flow)
    traced.sequence_parallel_blocker = why
    first, last = (traced.layers.index(region[0]), traced.layers.index(region[1])) if region else (0, -1)
    for index, layer in enumerate(traced.layers):
        if not first <= index <= last:  # outside the region the stream is whole: these run replicated
            sites = traced.tp[layer].sites
            for path in [p for p, s in sites.items() if s.style in SEQUENCE_PARALLEL_STYLES]:
                del sites[path]
    if region:
        entry, exit_ = region
        call = traced.calls[entry]
        traced.tp[entry].sites[entry] = TPSite(
            style="sequence_parallel_entry",
            num_positional=len(call.args),
            input_key=_key_of(_stream_of(call), (call.args, call.kwargs)),
        )
        output = traced.calls[exit_].output
        traced.tp[exit_].sites[exit_] = TPSite(
            style="sequence_parallel_exit", input_key=0, num_positional=len(output) if isinstance(output, tuple) else 1
        )
