"""Activation recomputation per layer with torch's non-reentrant checkpointing.

"full" keeps only the layer's input and recomputes the whole layer in backward;
"selective" keeps the outputs of `autoplan.schema.profile.selective_save_ops()` (the matmuls)
and recomputes everything else (norms, activations, softmax, attention core), through
`torch.utils.checkpoint.create_selective_checkpoint_contexts`.

`checkpoint_wrapper` (as torchtitan) rather than the composable `checkpoint`: the
wrapper's region encloses the layer's own forward hooks, so tensor parallelism's
input/output redistributions run inside it both in forward and in recomputation;
with the composable hook they run outside in forward but inside in recomputation,
which selective checkpointing rejects. The wrapper adds `_checkpoint_wrapped_module.`
to parameter names; `state_dict()` (and `CHECKPOINT_PREFIX` users) strip it.

    >>> apply_recompute(model, {"blocks.0": "full", "blocks.1": "selective", "ln_f": "none"})  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from autoplan.schema.profile import selective_save_ops

SAVED_OPS = selective_save_ops()


def _save_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(module: nn.Module, choices: dict[str, str]) -> None:
    """Checkpoint each layer path of `choices` whose option is "full" or "selective", in place."""
    for path, choice in choices.items():
        if choice == "none":
            continue
        if choice not in ("full", "selective"):
            raise ValueError(f"recompute for {path!r} must be 'none', 'selective' or 'full', got {choice!r}")
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        kwargs = (
            {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_matmul_outputs)}
            if choice == "selective"
            else {}
        )
        wrapped = checkpoint_wrapper(getattr(parent, name), checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)
        setattr(parent, name, wrapped)
