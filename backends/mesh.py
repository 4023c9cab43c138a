"""The device mesh a plan runs on: ("pp", "dp", "tp"), tp innermost.

Ranks are laid out row-major, so the `tp` ranks of one group are consecutive (they
stay inside one node, where tensor parallelism's per-layer collectives need the fast
links) and `pp` is outermost (its point-to-point traffic is the lightest).

    >>> mesh = build_device_mesh(plan, "cpu")          # doctest: +SKIP
    >>> mesh["tp"].size(), mesh["dp"].get_local_rank()  # doctest: +SKIP
    (2, 1)
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autoplan.schema.plan import Plan

MESH_AXES = ("pp", "dp", "tp")


def check_world_size(plan: Plan, world_size: int) -> None:
    """ValueError unless the plan's mesh covers exactly `world_size` ranks."""
    dp, pp, tp = (plan.mesh.get(axis, 1) for axis in ("dp", "pp", "tp"))
    if dp * pp * tp != world_size:
        raise ValueError(f"plan mesh dp({dp}) * pp({pp}) * tp({tp}) = {dp * pp * tp} != world size {world_size}")


def build_device_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    """The 3-D ("pp", "dp", "tp") mesh of `plan` over the initialised default process group.

    `device_type` is "cpu" (gloo) or "cuda" (NCCL). Sub-groups inherit the default
    group's timeout, so a dead rank fails the others' collectives instead of hanging.
    """
    check_world_size(plan, dist.get_world_size())
    shape = tuple(plan.mesh.get(axis, 1) for axis in MESH_AXES)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
