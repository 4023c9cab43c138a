"""Execute a Plan on this rank: build the mesh, apply each technique, train.

    >>> model = apply_plan(job.module, plan, job.loss_fn)             # doctest: +SKIP
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)       # doctest: +SKIP
    >>> loss = model.train_step(tokens, targets=targets)  # the same global batch on every rank  # doctest: +SKIP
    >>> optimizer.step(); optimizer.zero_grad()                       # doctest: +SKIP

Every rank passes the same GLOBAL batch; the runner takes this rank's data-parallel
slice (dim 0), splits it into `plan.num_micro_batches` micro-batches, accumulates
gradients, and returns the global mean loss, identical on every rank. With pp > 1 the
stage schedule is `autoplan.backends.pipeline`'s; slicing and the loss mean stay here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Protocol, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.device_mesh import DeviceMesh

from autoplan.backends.compose import apply_techniques
from autoplan.backends.materialize import InitRecipe, is_on_meta, materialize
from autoplan.backends.mesh import build_device_mesh
from autoplan.backends.tensor_parallel import gather_full_state_dict
from autoplan.schema.plan import Plan

FSDP_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"
"""FSDP2 warns whenever a wrapped root returns a view (our logits are one): a hazard only for
in-place ops on the output, which train_step never does. Silenced around train_step's own
forward calls only: the user's warning filters stay as they were."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _SyncsGradients(Protocol):
    """FSDP2's `fully_shard` modules and composable `replicate`'s: gradient sync can wait."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None: ...


def _device_type() -> str:
    """ "cuda" under NCCL (also "cpu:gloo,cuda:nccl"), else "cpu" (gloo)."""
    return "cuda" if "nccl" in dist.get_backend() else "cpu"


class ParallelModel:
    """A model running a Plan on this rank (see the module docstring)."""

    def __init__(self, module: nn.Module, plan: Plan, mesh: DeviceMesh, loss_fn: LossFn, engine=None):
        self.module = module
        self.plan = plan
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.engine = engine
        """The pipeline engine when pp > 1 (it owns the stage modules), else None."""
        self.device = (
            torch.device(_device_type(), torch.cuda.current_device())
            if _device_type() == "cuda"
            else torch.device("cpu")
        )

    def _local_batch(self, inputs: tuple, targets: torch.Tensor | None) -> tuple[tuple, torch.Tensor | None]:
        """This dp rank's slice of the global batch (every input and the targets along dim 0)."""
        dp, dp_rank = self.mesh["dp"].size(), self.mesh["dp"].get_local_rank()
        expected = self.plan.micro_batch_size * self.plan.num_micro_batches * dp
        if inputs[0].shape[0] != expected:
            raise ValueError(
                f"global batch of {inputs[0].shape[0]} != micro_batch_size({self.plan.micro_batch_size})"
                f" * num_micro_batches({self.plan.num_micro_batches}) * dp({dp}) = {expected}"
            )
        local = tuple(x.chunk(dp)[dp_rank].to(self.device) for x in inputs)
        return local, None if targets is None else targets.chunk(dp)[dp_rank].to(self.device)

    def train_step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor | None = None) -> float:
        """Forward + backward of one global batch; returns the global mean loss (same on every rank).

        `inputs` is the model's input tensor or a tuple of its positional inputs; `targets`
        (positional or keyword) go to `loss_fn(output, targets)`. Gradients are left in
        `.parameters()` for the user's optimizer.
        """
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        local_inputs, local_targets = self._local_batch(inputs, targets)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=FSDP_VIEW_WARNING)
            if self.engine is not None:
                local_loss = torch.tensor(
                    float(self.engine.train_step(local_inputs, local_targets)), device=self.device
                )
            else:
                local_loss = self._accumulate(local_inputs, local_targets)
        dist.all_reduce(local_loss, group=self.mesh["dp"].get_group())  # SUM: gloo has no AVG
        return local_loss.item() / self.mesh["dp"].size()

    def _accumulate(self, local_inputs: tuple, local_targets: torch.Tensor | None) -> torch.Tensor:
        """Gradient accumulation over the micro-batches; returns their mean loss (detached)."""
        num_micro = self.plan.num_micro_batches
        micro_inputs = [x.chunk(num_micro) for x in local_inputs]
        micro_targets = local_targets.chunk(num_micro) if local_targets is not None else [None] * num_micro
        # ZeRO 0/1 all-reduce / reduce-scatter once, after the last micro-batch (gradients stay
        # full-size meanwhile); ZeRO 2/3 reduce-scatter every micro-batch so gradients stay sharded.
        defer_sync = hasattr(self.module, "set_requires_gradient_sync") and self.plan.zero_stage <= 1 and num_micro > 1
        total = torch.zeros((), device=self.device)
        for index in range(num_micro):
            if defer_sync:
                cast(_SyncsGradients, self.module).set_requires_gradient_sync(index == num_micro - 1)
            output = self.module(*(parts[index] for parts in micro_inputs))
            # loss_fn is declared for tensors; without targets it is handed None, as train_step says
            loss = self.loss_fn(output, cast(torch.Tensor, micro_targets[index]))
            (loss / num_micro).backward()
            total += loss.detach().float()
        return total / num_micro

    def __call__(self, *inputs, **kwargs):
        return self.forward(*inputs, **kwargs)

    def forward(self, *inputs, **kwargs):
        """Inference on this rank's inputs (pp == 1 only)."""
        if self.engine is not None:
            raise NotImplementedError("forward() of a pipelined model: use train_step")
        return self.module(*inputs, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (DTensor shards where split): hand them to a torch optimizer."""
        return (param for _, param in self.named_parameters())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the original model's names."""
        source = self.engine if self.engine is not None else self.module
        return ((name.replace(_CHECKPOINT_PREFIX, ""), param) for name, param in source.named_parameters())

    def state_dict(self, full: bool = False) -> dict[str, torch.Tensor]:
        """`full=False`: this rank's (possibly sharded) tensors. `full=True`: the original
        model's keys with whole plain tensors, on every rank (a collective)."""
        if self.engine is not None:
            if not full:
                return dict(self.engine.named_parameters())
            return self.engine.full_state_dict()
        return gather_full_state_dict(self.module) if full else self.module.state_dict()

    def save(self, path, optimizer: torch.optim.Optimizer | None = None, step: int = 0):
        """Checkpoint the model (and `optimizer`) to the folder `path` with torch.distributed.checkpoint,
        atomically, loadable into any plan (`autoplan.backends.checkpoint`); every rank calls it.

        >>> pm.save(checkpoint_path("ckpt", 10), optimizer=opt, step=10)   # doctest: +SKIP
        """
        from autoplan.backends.checkpoint import save_checkpoint

        return save_checkpoint(self, path, optimizer, step)

    def load(self, path, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Load a checkpoint `save` wrote under any plan and world size, or a Hugging Face
        `save_pretrained` folder; returns the checkpoint's step (0 for a Hugging Face folder).

        >>> step = pm.load(latest_checkpoint("ckpt"), optimizer=opt)   # doctest: +SKIP
        """
        from autoplan.backends.checkpoint import load_checkpoint

        return load_checkpoint(self, path, optimizer)

    def load_pretrained(self, folder) -> None:
        """Load a Hugging Face `save_pretrained` folder's safetensors weights, each rank its shards.

        >>> pm.load_pretrained("llama-tiny/")   # doctest: +SKIP
        """
        from autoplan.backends.checkpoint import load_pretrained

        load_pretrained(self, folder)


def apply_plan(
    model: nn.Module, plan: Plan, loss_fn: LossFn, example_inputs: tuple | None = None, seed: int = 0
) -> ParallelModel:
    """Apply `plan` to `model` on this rank (the process group must be initialised).

    A model on the meta device (built under `with torch.device("meta"):`) is split first,
    then each rank allocates only its shard and initialises it from `seed` with the model's
    own initialisation, the same full values whatever the plan (`autoplan.backends.materialize`).
    A model on a real device keeps its values (`seed` unused).

    >>> pm = apply_plan(model, plan, loss_fn)     # doctest: +SKIP
    """
    mesh = build_device_mesh(plan, _device_type())  # ValueError unless the mesh covers the world
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a Hugging Face model: training keeps no key/value cache (as its Trainer)
    device = torch.device("cuda", torch.cuda.current_device()) if _device_type() == "cuda" else torch.device("cpu")
    init = InitRecipe.of(model, seed) if is_on_meta(model) else None  # before the techniques change the model
    if init is None and device.type == "cuda":
        model.to(device)
    if plan.mesh.get("pp", 1) > 1:
        from autoplan.backends.pipeline import build_pipeline

        engine = build_pipeline(model, plan, mesh, loss_fn, example_inputs, init)
        return ParallelModel(model, plan, mesh, loss_fn, engine=engine)
    apply_techniques(model, plan, mesh)  # tensor parallel, recompute, data parallel: in that order
    if init is not None:
        materialize(model, init, device)  # after them: each rank allocates its shards only
    return ParallelModel(model, plan, mesh, loss_fn)
