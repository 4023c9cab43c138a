"""Pipeline parallelism (pp > 1) on `torch.distributed.pipelining`.

    >>> engine = build_pipeline(model, plan, mesh, loss_fn, example_inputs)   # doctest: +SKIP
    >>> loss = engine.train_step((tokens,), targets)  # this dp rank's share, equal on all pp ranks  # doctest: +SKIP
    >>> torch.optim.SGD(engine.parameters(), lr=0.1).step()                   # doctest: +SKIP

Each pipeline rank r holds the stages r, r + pp, r + 2 pp, ... of `plan.stages` (cut by
`pipeline_split.split_model`, original FQNs kept: by torch.fx graph, or by module for
models fx cannot trace, such as Hugging Face Transformers models) and runs them with the
plan's schedule:

| plan.schedule      | torch class             | peak micro-batches whose activations rank r keeps |
|--------------------|-------------------------|---------------------------------------------------|
| "gpipe"            | ScheduleGPipe           | n (every forward before any backward)             |
| "1f1b"             | Schedule1F1B            | min(n, pp - r): warm-up forwards, then 1B1F       |
| "interleaved_1f1b" | ScheduleInterleaved1F1B | min(n v, (v - 1) m + 2 (pp - 1 - r) + 1) virtual-  |
|                    |                         | stage micro-batches (1/v of the rank's layers);   |
|                    |                         | m = n // max(1, n // pp); rank 0, m = pp: pp v +  |
|                    |                         | pp - 1 of them, Megatron-LM's pp (1 + (pp-1)/(pp v)) |

On top of that, whatever the schedule, every stage allocates once (and keeps across
steps) one receive buffer per micro-batch for its input activations (all stages but the
first) and one per micro-batch for the gradient of its output (all but the last): 2 n
boundary tensors of micro-batch size per middle stage.

Losses: the last stage computes `loss_fn(output_mb, target_mb)` per micro-batch, where
`output_mb` is what the model's forward returns (a Hugging Face ModelOutput included:
a stage split by module returns its tensors, `ModelSplit.model_output` rebuilds it); the
schedule back-propagates each micro-batch loss unscaled and then divides every gradient
by n (`scale_grads=True`), so gradients are those of the mean loss over the share.
Data parallel (FSDP / replicate) then averages over dp.

Tied parameters (GPT's tok_emb.weight is lm_head.weight), and a parameter outside every
layer that several stages split by module hold: every stage holding one of the
names gets its own copy, initialised from the one tensor, and after each backward the
copies' gradients are summed over the pipeline ranks that hold them (Megatron-LM's
embedding group), so every copy sees the full gradient and stays identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from autoplan.analysis.trace import as_exported
from autoplan.backends.compose import apply_techniques
from autoplan.backends.materialize import InitRecipe, full_tensors, materialize
from autoplan.backends.pipeline_split import ModelSplit, original_fqn, split_model
from autoplan.backends.tensor_parallel import gather_full_state_dict
from autoplan.schema.plan import Plan

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def validate_pipeline_plan(plan: Plan) -> None:
    """ValueError (with the arithmetic) for a plan torch's schedules cannot run."""
    pp, virtual, n = plan.mesh["pp"], plan.virtual_stages, plan.num_micro_batches
    if len(plan.stages) != pp * virtual:
        raise ValueError(
            f"plan has {len(plan.stages)} stages but pp({pp}) * virtual_stages({virtual}) = {pp * virtual}"
        )
    for position, stage in enumerate(plan.stages):
        if stage.index != position or stage.pp_rank != position % pp:
            raise ValueError(
                f"stage {position} has index={stage.index}, pp_rank={stage.pp_rank}; "
                f"expected index={position}, pp_rank={position} % pp({pp}) = {position % pp}"
            )
    if plan.schedule != "interleaved_1f1b" and virtual != 1:
        raise ValueError(
            f"schedule={plan.schedule!r} runs one stage per rank, got virtual_stages={virtual}; "
            f"use schedule='interleaved_1f1b'"
        )
    if plan.schedule == "1f1b" and n < pp:
        raise ValueError(f"schedule='1f1b' needs num_micro_batches >= pp: {n} < {pp}")
    if plan.schedule == "interleaved_1f1b":
        rounds = max(1, n // pp)
        if n % rounds:
            raise ValueError(
                f"schedule='interleaved_1f1b' needs num_micro_batches({n}) to be a multiple of "
                f"max(1, num_micro_batches // pp) = max(1, {n} // {pp}) = {rounds}"
            )


class PipelineEngine:
    """This rank's pipeline stages and the schedule that runs them."""

    def __init__(
        self,
        schedule,
        stages: list[PipelineStage],
        stage_modules: list[nn.Module],
        pp_group: dist.ProcessGroup,
        num_micro_batches: int,
        tied_groups: list[tuple[dist.ProcessGroup | None, list[nn.Parameter]]],
        unreached_state: dict[str, torch.Tensor],
    ):
        self.schedule = schedule
        """The torch schedule object (ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B)."""
        self.stages = stages
        self.stage_modules = stage_modules
        """Per local stage, the module the stage runs (`ModelSplit.stage_modules`); its FQNs are the model's."""
        self.pp_group = pp_group
        self.num_micro_batches = num_micro_batches
        self._tied_groups = tied_groups
        self._unreached_state = unreached_state
        self._has_first = any(stage.is_first for stage in stages)
        self._has_last = any(stage.is_last for stage in stages)
        self._last_stage_rank = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        self._device = stages[0].device

    def train_step(self, local_inputs: tuple[torch.Tensor, ...], local_targets: torch.Tensor | None) -> float:
        """Forward and backward of this dp rank's share in `num_micro_batches` micro-batches;
        returns the mean micro-batch loss on every pipeline rank."""
        batch = local_inputs[0].shape[0] if local_inputs else None
        if batch is not None and batch % self.num_micro_batches:
            raise ValueError(
                f"local batch of {batch} sequences does not split into "
                f"num_micro_batches={self.num_micro_batches} equal micro-batches"
            )
        losses: list[torch.Tensor] = []
        self.schedule.step(
            *(local_inputs if self._has_first else ()),
            target=local_targets if self._has_last else None,
            losses=losses,
            return_outputs=False,
        )
        self._sum_tied_gradients()
        loss = (
            torch.stack([micro_loss.detach().float() for micro_loss in losses]).mean()
            if self._has_last
            else torch.zeros((), device=self._device)
        )
        dist.broadcast(loss, src=self._last_stage_rank, group=self.pp_group)
        return loss.item()

    def _sum_tied_gradients(self) -> None:
        """Each copy of a tied parameter gets the sum of all copies' gradients."""
        for group, parameters in self._tied_groups:
            for parameter in parameters:
                if parameter.grad is None:  # a copy unused this step still joins the sum
                    parameter.grad = torch.zeros_like(parameter)
                # A vocab-split embedding's gradient can come back Replicate; lay it out like
                # its parameter (a local slice) so every copy's local gradient lines up.
                if isinstance(parameter.grad, DTensor):
                    placements = cast(DTensor, parameter).placements  # a DTensor gradient's parameter is one
                    if parameter.grad.placements != placements:
                        parameter.grad = parameter.grad.redistribute(placements=placements)
            grads = cast(
                list[torch.Tensor],  # none is None: set above
                [
                    parameter.grad._local_tensor if isinstance(parameter.grad, DTensor) else parameter.grad
                    for parameter in parameters
                ],
            )
            total = torch.stack(grads).sum(0)
            if group is not None:
                dist.all_reduce(total, group=group)
            for grad in grads:
                grad.copy_(total)

    def named_parameters(self):
        """(original FQN, parameter) of this rank's stages."""
        for module in self.stage_modules:
            for name, parameter in module.named_parameters():
                yield original_fqn(name), parameter

    def parameters(self):
        return (parameter for _, parameter in self.named_parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model under its original key, full tensors
        (DTensors gathered over dp/tp), on every rank; collective over the whole job."""
        local = dict(self._unreached_state)
        for module in self.stage_modules:  # gathers over dp / tp, undoes fused q|k|v row permutations
            for name, value in gather_full_state_dict(module).items():
                local[original_fqn(name)] = value.detach().cpu()
        gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(gathered, local, group=self.pp_group)
        parts = cast(list[dict[str, torch.Tensor]], gathered)  # all_gather_object filled every slot
        return {name: value for part in parts for name, value in part.items()}


def build_pipeline(
    model: nn.Module,
    plan: Plan,
    mesh: DeviceMesh,
    loss_fn: Callable,
    example_inputs: tuple[torch.Tensor, ...] | None,
    init: InitRecipe | None = None,
) -> PipelineEngine:
    """Cut `model` into the plan's stages, parallelise this rank's stages and wrap them in
    the plan's schedule. `mesh` has dims ("pp", "dp", "tp"); `example_inputs` is one
    global batch (real, fake or meta tensors), from which each stage's input and output
    shapes are known before the first step (see `_stage_io_examples`). `init`: the recipe
    of a model on meta; each stage is materialised on this rank after it is parallelised."""
    validate_pipeline_plan(plan)
    pp_mesh = mesh["pp"]
    pp_rank, pp_group = pp_mesh.get_local_rank(), pp_mesh.get_group()
    device = _device_of(mesh)
    micro_batch = None if example_inputs is None else tuple(x[: plan.micro_batch_size] for x in example_inputs)
    split = split_model(model, [stage.layers for stage in plan.stages], micro_batch)
    shapes = _stage_io_examples(split, micro_batch, plan)
    local_indices = [stage.index for stage in plan.stages_of_rank(pp_rank)]
    stage_modules, stages = [], []
    for index in local_indices:
        module = split.local_copy(index, None if init is not None else device)
        _parallelize_stage(module, plan, plan.stages[index].layers, mesh)
        if init is not None:
            materialize(module, init, device)
        stage_modules.append(module)
        inputs, outputs = shapes[index] if shapes else (None, None)
        stages.append(
            PipelineStage(
                module, index, len(plan.stages), device, input_args=inputs, output_args=outputs, group=pp_group
            )
        )

    def stage_loss_fn(output, target):  # the user's loss_fn sees what the model's forward returns
        return loss_fn(split.model_output(output), target)

    schedule = SCHEDULES[plan.schedule](
        stages if plan.schedule == "interleaved_1f1b" else stages[0],
        n_microbatches=plan.num_micro_batches,
        loss_fn=stage_loss_fn,
        scale_grads=True,
    )
    tied = _tied_gradient_groups(split, stage_modules, local_indices, mesh, plan.mesh["pp"])
    unreached = split.unreached_state if pp_rank == 0 else {}
    if init is not None and unreached:
        unreached = {name: value.cpu() for name, value in full_tensors(init, list(unreached), device)}
    return PipelineEngine(schedule, stages, stage_modules, pp_group, plan.num_micro_batches, tied, unreached)


def _stage_io_examples(
    split: ModelSplit, micro_batch: tuple[torch.Tensor, ...] | None, plan: Plan
) -> list[tuple[tuple, tuple]] | None:
    """(inputs, outputs) of every stage for `micro_batch` (one micro-batch of the model's
    inputs), as fake tensors. The model code runs as under torch.export (`as_exported`), so
    that Hugging Face takes its traceable paths (data-dependent mask checks skipped; Mixtral's
    experts otherwise pick a grouped matmul that rejects float32 fake tensors).

    Given to `PipelineStage`, they let torch size its receive buffers statically; without
    them it infers shapes by running stage s on `torch.empty` inputs made from stage s-1's
    metadata, which breaks on integer inputs (token ids, positions) that index an
    embedding. None (torch infers) when sequence parallelism makes boundary activations
    tp-local shards of the sequence, which this single-process propagation cannot see.
    """
    if micro_batch is None or (plan.mesh["tp"] > 1 and plan.sequence_parallel):
        return None
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = tuple(mode.from_tensor(x) for x in micro_batch)
    examples = []
    with mode, as_exported():
        for module in split.stage_modules:
            outputs = module(*values)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            examples.append((values, outputs))
            values = tuple(value.detach().requires_grad_(value.requires_grad) for value in outputs)
    return examples


def _device_of(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def _parallelize_stage(module: nn.Module, plan: Plan, layers: list[str], mesh: DeviceMesh) -> None:
    """Tensor parallel, then recompute, then data parallel on one stage module (`compose`);
    the pipeline stage recognises the FSDPModule and drives it (no per-micro-batch gradient
    sync, unshard/reshard, one reduce at the end of the step)."""
    apply_techniques(module, plan, mesh, layers=layers)


def _tied_gradient_groups(
    split: ModelSplit, stage_modules: list[nn.Module], local_indices: list[int], mesh: DeviceMesh, pp: int
) -> list[tuple[dist.ProcessGroup | None, list[nn.Parameter]]]:
    """For each tied group: the process group of the pp ranks holding a copy (None when
    this rank holds all copies) and this rank's copies. Every rank creates every group,
    in the same order, as `new_group` requires."""
    result = []
    for names in split.tied_groups:
        holder_ranks = sorted({stage % pp for stage in split.holders(names)})
        group = _pp_subgroup(mesh, holder_ranks) if len(holder_ranks) > 1 else None
        parameters = [
            parameter
            for module in stage_modules
            for name, parameter in module.named_parameters()
            if original_fqn(name) in names
        ]
        if parameters and (group is not None or len(parameters) > 1):
            result.append((group, parameters))
    return result


def _pp_subgroup(mesh: DeviceMesh, pp_ranks: list[int]) -> dist.ProcessGroup | None:
    """The group of `pp_ranks` within this rank's pipeline (same dp and tp coordinates);
    None on a rank whose pp rank is not among them."""
    if len(pp_ranks) == mesh["pp"].size():
        return mesh["pp"].get_group()
    ranks = mesh.mesh.reshape(mesh["pp"].size(), -1)  # (pp, dp * tp) global ranks
    mine = None
    for column in range(ranks.shape[1]):
        members = ranks[pp_ranks, column].tolist()
        group = dist.new_group(members)
        if dist.get_rank() in members:
            mine = group
    return mine
