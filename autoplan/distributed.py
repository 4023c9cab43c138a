"""`parallelize`: the entry point every rank of a training job calls.

    # train.py, started by `torchrun --nproc-per-node 4 train.py` or `autoplan run`
    pm = autoplan.parallelize(model, autoplan.ClusterSpec.local(world_size=4),
                              example_inputs=(tokens,), loss_fn=loss_fn)
    loss = pm.train_step(tokens, targets=targets)

It initialises the process group from the environment when needed, plans on rank 0
(or takes a given Plan), makes every rank use the same plan, checks that the plan was
made for this model and this world size, then hands the Plan to the backends.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from autoplan.cluster import ClusterSpec
from autoplan.constraints import Constraints
from autoplan.plan import Plan

TIMEOUT_ENV = "AUTOPLAN_TIMEOUT_S"
"""Seconds a collective may wait before a rank gives up (a dead peer must not hang a job)."""
DEFAULT_TIMEOUT_S = 300


def init_process_group_from_env(device_kind: str) -> None:
    """Initialise the default process group as torchrun's environment describes it."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"no process group and no launcher environment ({', '.join(missing)} unset): "
                         "start the script with `torchrun --nproc-per-node N script.py` or `autoplan run`")
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend, timeout=timeout)


def _agree_on_plan(make_plan: Callable[[], Plan]) -> Plan:
    """Rank 0 plans; every rank receives the same Plan (planning is deterministic, but
    one source of truth rules out ranks disagreeing on a tie)."""
    payload: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = make_plan().model_dump_json()
        except ValueError as error:
            payload[0] = error
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], ValueError):
        raise payload[0]
    return Plan.model_validate_json(payload[0])


def parallelize(model: nn.Module, cluster: ClusterSpec, example_inputs: tuple, loss_fn: Callable | None = None,
                plan: Plan | Constraints | None = None, model_name: str | None = None):
    """Plan (unless given a Plan) and apply it to `model` on this rank.

    `plan`: None plans freely; a Constraints plans with those pins; a Plan is used as is
    after checking it matches this model and world size. Returns a ParallelModel
    (`train_step`, `parameters`, `state_dict`, `plan`).

    >>> pm = parallelize(model, ClusterSpec.local(world_size=4), (tokens,), loss_fn)  # doctest: +SKIP
    """
    from autoplan.api import plan as make_plan
    from autoplan.backends.runner import apply_plan
    from autoplan.profile import profile_model
    from autoplan.zoo import output_mean

    loss_fn = loss_fn or output_mean
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    init_process_group_from_env(cluster.device.kind)
    world_size = dist.get_world_size()
    if cluster.world_size != world_size:
        raise ValueError(f"cluster world_size {cluster.world_size} (= {cluster.num_nodes} nodes x "
                         f"{cluster.devices_per_node} devices) != launched world size {world_size}")
    if isinstance(plan, Plan):
        if plan.world_size != world_size:
            raise ValueError(f"plan mesh dp({plan.mesh['dp']}) * pp({plan.mesh['pp']}) * tp({plan.mesh['tp']}) = "
                             f"{plan.world_size} != world size {world_size}: the plan was made for another cluster")
        fingerprint = profile_model(model, example_inputs, model_name=model_name or plan.model_name).fingerprint
        if plan.model_fingerprint and plan.model_fingerprint != fingerprint:
            raise ValueError(f"plan was made for model {plan.model_name!r} (fingerprint {plan.model_fingerprint}), "
                             f"not this model (fingerprint {fingerprint}): re-plan with `autoplan plan`")
    else:
        constraints = plan
        plan = _agree_on_plan(lambda: make_plan(model, cluster, example_inputs=example_inputs, loss_fn=loss_fn,
                                                constraints=constraints, model_name=model_name))
    return apply_plan(model, plan, loss_fn, example_inputs=example_inputs)
