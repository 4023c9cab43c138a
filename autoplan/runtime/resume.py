"""Training that survives a dead rank and a resized world: `autoplan run --checkpoint-dir D`.

    autoplan run plan.json --steps 100 --checkpoint-dir ckpt --checkpoint-every 10 --max-restarts 3

Every rank of the job (`autoplan.runtime.worker`) resumes from the newest complete checkpoint
under D (`autoplan.backends.checkpoint.latest_checkpoint`), trains the remaining steps with
AdamW, and saves model and optimizer every N steps and after the last one. With
`--max-restarts K` torch's elastic agent (`torch.distributed.run`) restarts every rank when
one dies; the restarted ranks resume from the last checkpoint, so the job finishes with the
parameters of an uninterrupted run.

When the job starts on another world size than the plan's (a new `--nproc`, or an elastic
`--nnodes MIN:MAX` that lost a node), it re-plans for the world it has (`replan_cluster`:
the plan's cluster with as many devices) and the checkpoint is resharded into the new plan
by DCP. A job never silently continues on a plan made for another world size: without a
checkpoint folder, a mismatch is refused; with one, rank 0 prints the new plan.

For tests, AUTOPLAN_FAIL_AT_STEP=k (with AUTOPLAN_FAIL_RANK=r, default 1) makes that rank
exit at the start of step k on the job's first attempt (TORCHELASTIC_RESTART_COUNT = 0),
as a killed rank would.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.plan import Plan

FAIL_AT_STEP_ENV = "AUTOPLAN_FAIL_AT_STEP"
FAIL_RANK_ENV = "AUTOPLAN_FAIL_RANK"
FAILED_EXIT_CODE = 17
"""The exit status of a rank AUTOPLAN_FAIL_AT_STEP stopped (what the elastic agent sees)."""


def replan_cluster(cluster: ClusterSpec, world_size: int) -> ClusterSpec:
    """`cluster` with `world_size` devices: whole nodes of the same size where they divide it,
    else one node of `world_size` devices.

    >>> replan_cluster(ClusterSpec.local(4), 2).world_size
    2
    """
    per_node = cluster.devices_per_node
    if world_size % per_node == 0:
        update = {"num_nodes": world_size // per_node}
    else:
        update = {"num_nodes": 1, "devices_per_node": world_size}
    return ClusterSpec.model_validate({**cluster.model_dump(), **update})  # validated, unlike model_copy


def plan_for_world(plan: Plan, world_size: int, resuming: bool) -> tuple[Plan | None, ClusterSpec]:
    """(the plan to run, its cluster): `plan` when it was made for `world_size` ranks; None (re-plan
    for `replan_cluster`) when it was not and the job resumes from checkpoints; else a ValueError."""
    if plan.world_size == world_size:
        return plan, plan.cluster
    if not resuming:
        raise ValueError(
            f"the job has {world_size} ranks but the plan was made for dp({plan.mesh['dp']}) * "
            f"pp({plan.mesh['pp']}) * tp({plan.mesh['tp']}) = {plan.world_size}: launch {plan.world_size} "
            f"ranks, re-plan, or give --checkpoint-dir to re-plan for the ranks there are and reshard"
        )
    return None, replan_cluster(plan.cluster, world_size)


@dataclass
class ResumeResult:
    """What one attempt of a checkpointed job did."""

    resumed_from: int
    """The step of the checkpoint it started from (0: none)."""
    losses: list[float] = field(default_factory=list)
    """The global mean loss of each step this attempt trained (steps resumed_from + 1 ..)."""
    step_times_s: list[float] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    """The checkpoint folders it wrote."""


def _fail_here(step: int) -> None:
    """The AUTOPLAN_FAIL_AT_STEP hook: this rank dies at the start of `step` on the first attempt."""
    if os.environ.get(FAIL_AT_STEP_ENV) is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if int(os.environ[FAIL_AT_STEP_ENV]) == step and os.environ.get("RANK") == os.environ.get(FAIL_RANK_ENV, "1"):
        sys.stderr.write(
            f"autoplan.worker: rank {os.environ.get('RANK')}: stopped at step {step} ({FAIL_AT_STEP_ENV})\n"
        )
        sys.stderr.flush()
        os._exit(FAILED_EXIT_CODE)


def train_resumable(model, batch: tuple, steps: int, checkpoint_dir: str | Path, every: int, lr: float = 1e-4):
    """Resume `model` (a ParallelModel) from the newest complete checkpoint under `checkpoint_dir`,
    train up to step `steps` on the global `batch` = (inputs, targets) with AdamW at `lr`, saving
    every `every` steps (0: only after the last) and after the last step."""
    import torch

    from autoplan.backends.checkpoint import checkpoint_path, latest_checkpoint

    optimizer = torch.optim.AdamW(list(model.parameters()), lr=lr)
    latest = latest_checkpoint(checkpoint_dir)
    result = ResumeResult(resumed_from=model.load(latest, optimizer=optimizer) if latest is not None else 0)
    inputs, targets = batch
    for step in range(result.resumed_from + 1, steps + 1):
        _fail_here(step)
        start = time.perf_counter()
        result.losses.append(model.train_step(inputs, targets))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.step_times_s.append(time.perf_counter() - start)
        if step == steps or (every and step % every == 0):
            path = checkpoint_path(checkpoint_dir, step)
            model.save(path, optimizer=optimizer, step=step)
            result.saved.append(str(path))
    return result
