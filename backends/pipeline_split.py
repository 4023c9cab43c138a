"""Cut a model into pipeline stages at the plan's layer boundaries, keeping original FQNs.

    >>> split = split_model(model, [["tok_emb", "pos_emb", "drop", "blocks.0", "blocks.1"],
    ...                             ["blocks.2", "blocks.3", "ln_f", "lm_head"]])   # doctest: +SKIP
    >>> split.stage_modules[1]                      # a GraphModule: (x,) -> logits   # doctest: +SKIP
    >>> dict(split.stage_modules[1].named_parameters())["lm_head.weight"]          # doctest: +SKIP

Why not `torch.distributed.pipelining.pipeline()`: it traces with `torch.export` and
unflattens each stage into `InterpreterModule`s running ATen graphs, so a stage holds no
`nn.Linear` / `nn.Embedding` for `parallelize_module` (its Colwise/Rowwise styles accept
only those; checked on gpt-tiny: `blocks.0.attn.c_attn` becomes an InterpreterModule).
Here each stage runs the user's own eager layers at their original paths
("blocks.3.attn.c_attn"), which is what tensor parallel, recompute, FSDP and the full
state dict need. Tied parameters are treated as `pipeline()` does (a copy per stage).
Two ways to cut, tried in this order:

**By graph** (`pipeline_split_graph`): the model traced with `torch.fx` keeping every plan
layer a leaf `call_module`; each stage is a small `GraphModule` cut from that graph, whose
glue is traced and whose layers are the model's modules.

**By module** (`pipeline_split_module`), when torch.fx cannot trace forward (Hugging Face
Transformers models: "co_varnames is too small"): each stage is a copy of the model's
skeleton that holds its own layers, stubs for the others, and runs the model's own forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoplan.backends.pipeline_split_graph import LayerLeafTracer, split_graph
from autoplan.backends.pipeline_split_module import Template, split_by_module

# Wrappers that insert a path component without changing what a parameter is.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def original_fqn(name: str) -> str:
    """The model's own name of a stage parameter: wrapper path components removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass
class ModelSplit:
    """The stage modules of one model; layers are shared with the model until copied."""

    stage_modules: list[nn.Module]
    """Stage index -> module (a GraphModule, or a skeleton copy of the model when split by
    module) whose parameters keep the model's FQNs."""
    tied_groups: list[list[str]]
    """Parameter FQNs that are one tensor in the model and that stages copy: groups of >= 2
    tied names, and single names that several stage modules hold (a parameter outside
    every layer). Every copy gets the sum of all copies' gradients."""
    unreached_state: dict[str, torch.Tensor]
    """State-dict entries no stage uses (modules never called in forward)."""
    output_template: Template | None = None
    """Split by module: how the model's output is rebuilt from the tensors the last stage
    returns; None when the last stage returns the model's output itself."""

    def holders(self, names: list[str]) -> list[int]:
        """Stages whose module holds any of `names`."""
        return [
            index
            for index, module in enumerate(self.stage_modules)
            if any(name in dict(module.named_parameters(remove_duplicate=False)) for name in names)
        ]

    def local_copy(self, stage_index: int, device: torch.device | None) -> nn.Module:
        """A private copy of one stage on `device` (tied parameters get their own copy);
        None leaves it where it is (on meta, for `materialize` once it is parallelised)."""
        stage = copy.deepcopy(self.stage_modules[stage_index])
        return stage if device is None else stage.to(device)

    def model_output(self, stage_output: Any) -> Any:
        """What the model's forward returns, from what the last stage returned: the value a
        user's loss_fn takes (`out.logits` of a Hugging Face ModelOutput)."""
        if self.output_template is None:
            return stage_output
        return self.output_template.rebuild(stage_output if isinstance(stage_output, tuple) else (stage_output,))


def split_model(
    model: nn.Module, stage_layers: list[list[str]], example_inputs: tuple[torch.Tensor, ...] | None = None
) -> ModelSplit:
    """Cut `model` into len(stage_layers) stage modules; stage i runs layers stage_layers[i].

    By graph when torch.fx traces forward, else by module, which needs `example_inputs`
    (one micro-batch of the model's inputs; real, fake or meta tensors) to record each
    layer's output shapes and dataflow (`pipeline_split_graph`, `pipeline_split_module`).
    """
    layer_names = {name for names in stage_layers for name in names}
    missing = sorted(name for name in layer_names if _find_module(model, name) is None)
    if missing:
        raise ValueError(f"plan stages name layers that are not modules of {type(model).__name__}: {missing}")
    output_template: Template | None
    try:
        graph = LayerLeafTracer(layer_names).trace(model)
        hidden = sorted(layer_names - {node.target for node in graph.nodes if node.op == "call_module"})
        if hidden:  # inside a torch.nn module fx keeps whole (nn.Transformer's encoder layers)
            raise ValueError(f"plan layers {hidden} run inside modules torch.fx keeps as leaves")
    except Exception as error:  # fx raises TraceError, TypeError, ValueError ("co_varnames is too small"), ...
        reason = (
            f"torch.fx cannot trace {type(model).__name__}.forward with the plan layers as leaf modules "
            f"({type(error).__name__}: {error})"
        )
        if example_inputs is None:
            raise ValueError(f"{reason}; splitting by module instead needs example_inputs") from error
        modules, output_template = split_by_module(model, stage_layers, example_inputs, reason)
    else:
        modules, output_template = list(split_graph(model, graph, stage_layers)), None
    used = {name for module in modules for name in module.state_dict()}
    unreached = {name: value.detach().clone() for name, value in model.state_dict().items() if name not in used}
    return ModelSplit(modules, _copied_parameter_groups(model, modules), unreached, output_template)


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _copied_parameter_groups(model: nn.Module, modules: list[nn.Module]) -> list[list[str]]:
    """Names that refer to one Parameter object (e.g. [["tok_emb.weight", "lm_head.weight"]]),
    then each other name that more than one stage module holds."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    groups = [names for names in names_of.values() if len(names) > 1]
    tied = {name for names in groups for name in names}
    num_holders: dict[str, int] = {}
    for module in modules:
        for name in {name for name, _ in module.named_parameters(remove_duplicate=False)}:
            num_holders[name] = num_holders.get(name, 0) + 1
    return groups + [[name] for name, count in num_holders.items() if count > 1 and name not in tied]
