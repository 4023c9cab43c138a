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
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from autoplan.errors import AutoplanError
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.plan import Plan

if TYPE_CHECKING:
    from autoplan.backends.runner import ParallelModel

TIMEOUT_ENV = "AUTOPLAN_TIMEOUT_S"
"""Seconds a collective may wait before a rank gives up (a dead peer must not hang a job)."""
DEFAULT_TIMEOUT_S = 300


def check_devices(device_kind: str, processes_per_node: int) -> None:
    """Refuse a plan whose devices this machine lacks (a CUDA plan without a GPU), in one line."""
    if device_kind != "cuda":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < processes_per_node:
        raise ValueError(
            f"the plan runs {processes_per_node} CUDA device(s) per node but this machine has {found}: "
            f"run it where the cluster's GPUs are, or plan for this machine with --cluster local:N"
        )


def init_process_group_from_env(device_kind: str) -> None:
    """Initialise the default process group as torchrun's environment describes it."""
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"no process group and no launcher environment ({', '.join(missing)} unset): "
            "start the script with `torchrun --nproc-per-node N script.py` or `autoplan run`"
        )
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        check_devices(device_kind, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        dist.init_process_group(backend, timeout=timeout)
        return
    # A restarted job (torch's elastic agent): the launcher's store can still hold the previous
    # attempt's keys, and a rank reading a dead peer's address fails ("connection refused", seen
    # on a loaded machine). Each attempt keeps its keys under a prefix of its own.
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"autoplan/attempt_{restart}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


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
    return Plan.model_validate_json(cast(str, payload[0]))  # rank 0's plan, as JSON


class LazyParallelModel:
    """What `parallelize(model, cluster)` returns without example inputs: like torch.compile,
    it plans at the first `train_step`, from that global batch (every rank passes the same
    one, rank 0 plans, every rank receives its plan), and from then on is the ParallelModel.

        >>> pm = parallelize(model, cluster)            # doctest: +SKIP
        >>> loss = pm.train_step(tokens, targets)  # plans, applies the plan, trains one batch  # doctest: +SKIP
        >>> opt = torch.optim.AdamW(pm.parameters())  # the planned (sharded) parameters  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        cluster: ClusterSpec,
        loss_fn: Callable | None,
        plan: Plan | Constraints | None,
        model_name: str | None,
        seed: int = 0,
    ):
        self._pending = (model, cluster, loss_fn, plan, model_name, seed)
        self._model: ParallelModel | None = None

    def train_step(self, inputs, targets=None) -> float:
        if self._model is None:
            model, cluster, loss_fn, plan, model_name, seed = self._pending
            example_inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            self._model = parallelize(
                model, cluster, example_inputs, loss_fn=loss_fn, plan=plan, model_name=model_name, seed=seed
            )
        return self._model.train_step(inputs, targets)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._model is None:
            raise AutoplanError(
                f"parallelize(model, cluster) has not planned yet, so it has no {name!r}: call "
                f"pm.train_step(inputs, targets) once first (it plans from that batch), then make "
                f"the optimizer from pm.parameters(); or pass example_inputs= to plan at once"
            )
        return getattr(self._model, name)


def parallelize(
    model: nn.Module,
    cluster: ClusterSpec,
    example_inputs: tuple | None = None,
    loss_fn: Callable | None = None,
    plan: Plan | Constraints | None = None,
    model_name: str | None = None,
    seed: int = 0,
):
    """Plan (unless given a Plan) and apply it to `model` on this rank.

    `plan`: None plans freely; a Constraints plans with those pins; a Plan is used as is
    after checking it matches this model and world size. Returns a ParallelModel
    (`train_step`, `parameters`, `state_dict`, `plan`). Without `example_inputs` it returns
    a LazyParallelModel, which plans at its first `train_step` from that batch.

    A model built under `with torch.device("meta"):` is split before anything is
    allocated; each rank then allocates its own shard and initialises it from `seed` with
    the model's own initialisation, the same full values whatever the plan (docs/meta_start.md).

    >>> pm = parallelize(model, ClusterSpec.local(world_size=4), (tokens,), loss_fn)  # doctest: +SKIP
    >>> pm = parallelize(model, ClusterSpec.local(world_size=4))                      # doctest: +SKIP
    """
    from autoplan.backends.runner import apply_plan
    from autoplan.planner.planning import check_plan_matches
    from autoplan.planner.planning import plan as make_plan
    from autoplan.zoo import output_mean

    loss_fn = loss_fn or output_mean
    init_process_group_from_env(cluster.device.kind)
    world_size = dist.get_world_size()
    if cluster.world_size != world_size:
        raise ValueError(
            f"cluster world_size {cluster.world_size} (= {cluster.num_nodes} nodes x "
            f"{cluster.devices_per_node} devices) != launched world size {world_size}"
        )
    if example_inputs is None:
        return LazyParallelModel(model, cluster, loss_fn, plan, model_name, seed)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if isinstance(plan, Plan):
        plan = Plan.model_validate(plan.model_dump())  # a model_copy(update=...) skipped the checks
        if plan.world_size != world_size:
            raise ValueError(
                f"plan mesh dp({plan.mesh['dp']}) * pp({plan.mesh['pp']}) * tp({plan.mesh['tp']}) = "
                f"{plan.world_size} != world size {world_size}: the plan was made for another cluster"
            )
        check_plan_matches(plan, model, example_inputs, model_name)  # before any parameter is allocated
    else:
        constraints = plan
        plan = _agree_on_plan(
            lambda: make_plan(
                model,
                cluster,
                example_inputs=example_inputs,
                loss_fn=loss_fn,
                constraints=constraints,
                model_name=model_name,
            )
        )
    return apply_plan(model, plan, loss_fn, example_inputs=example_inputs, seed=seed)
