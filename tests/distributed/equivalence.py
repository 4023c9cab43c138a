"""Parallel training == one process: the shared check every backend test uses.

    plans = [plan_for("gpt-tiny", 4, dp=2, tp=2), plan_for("gpt-tiny", 4, pp=2, dp=2)]
    check_equivalence("gpt-tiny", plans)

Each plan is trained for STEPS optimizer steps on real gloo ranks from the same initial
weights and batches as a single process; losses and gathered parameters must agree
within RTOL (float32). Each plan trains the model its `model_name` names (a zoo name),
so `check_plans` takes plans of several models; all plans of one world size share one
set of spawned processes (spawning costs seconds, importing transformers in each rank more).
"""

from __future__ import annotations

import torch

from autoplan import ClusterSpec, Constraints, Plan
from autoplan.schema.plan import SEQUENCE_PARALLEL_STYLES
from autoplan.zoo import build
from tests.distributed.harness import run_ranks

STEPS = 3
GLOBAL_BATCH = 8
LR = 0.1
RTOL = 1e-5
ATOL = 1e-6


def make_optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def batches(job_name: str, steps: int = STEPS) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The same global batches on every rank and in the reference run."""
    jobs = (build(job_name, batch_size=GLOBAL_BATCH, device="cpu", seed=100 + step) for step in range(steps))
    return [(job.example_inputs, job.targets) for job in jobs]


def reference_run(job_name: str, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, plain PyTorch: the losses and final parameters to match."""
    job = build(job_name, batch_size=GLOBAL_BATCH, device="cpu", seed=0)
    optimizer = make_optimizer(job.module.parameters())
    losses = []
    for inputs, targets in batches(job_name, steps):
        loss = job.loss_fn(job.module(*inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in job.module.state_dict().items()}


def plan_for(job_name: str, world_size: int, **pins) -> Plan:
    """A plan for the zoo model on `local:world_size`, every given field pinned."""
    import autoplan

    job = build(job_name, batch_size=GLOBAL_BATCH, device="meta")
    return autoplan.plan(
        job.module,
        ClusterSpec.local(world_size=world_size),
        example_inputs=job.example_inputs,
        loss_fn=job.loss_fn,
        constraints=Constraints(**pins),
        model_name=job_name,
    )


def _train_plans_on_rank(rank: int, world_size: int, plan_jsons: list[str], steps: int):
    from autoplan.backends.runner import apply_plan

    results = []
    for plan_json in plan_jsons:
        plan = Plan.model_validate_json(plan_json)
        job = build(plan.model_name, batch_size=GLOBAL_BATCH, device="cpu", seed=0)
        model = apply_plan(job.module, plan, job.loss_fn, example_inputs=job.example_inputs)
        optimizer = make_optimizer(model.parameters())
        losses = []
        for inputs, targets in batches(plan.model_name, steps):
            losses.append(model.train_step(inputs, targets))
            optimizer.step()
            optimizer.zero_grad()
        state = model.state_dict(full=True)
        results.append((losses, {k: v.detach().clone() for k, v in state.items()} if rank == 0 else None))
    return results


def describe(plan: Plan) -> str:
    """The plan's choices on one line, for failure messages and test ids."""
    return (
        f"{plan.model_name} mesh={plan.mesh} zero={plan.zero_stage} schedule={plan.schedule} "
        f"v={plan.virtual_stages} sp={plan.sequence_parallel} "
        f"recompute={sorted(set(plan.recompute_of().values()))}"
    )


def check_plans(plans: list[Plan], steps: int = STEPS) -> None:
    """Train every plan (each on its own model, `plan.model_name`) on its world size and
    compare with that model's single-process run."""
    references = {name: reference_run(name, steps) for name in dict.fromkeys(p.model_name for p in plans)}
    by_world: dict[int, list[Plan]] = {}
    for plan in plans:
        by_world.setdefault(plan.world_size, []).append(plan)
    for world_size, group in by_world.items():
        per_rank = run_ranks(_train_plans_on_rank, world_size, args=([p.model_dump_json() for p in group], steps))
        for index, plan in enumerate(group):
            label = describe(plan)
            expected_losses, expected_state = references[plan.model_name]
            for rank in range(world_size):
                losses = per_rank[rank][index][0]
                torch.testing.assert_close(
                    torch.tensor(losses),
                    torch.tensor(expected_losses),
                    rtol=RTOL,
                    atol=ATOL,
                    msg=lambda m, label=label, rank=rank: f"{label}: rank {rank} losses differ\n{m}",
                )
            state = per_rank[0][index][1]
            assert set(state) == set(expected_state), (
                f"{label}: state_dict keys differ: {sorted(set(state) ^ set(expected_state))}"
            )
            for name, value in expected_state.items():
                torch.testing.assert_close(
                    state[name],
                    value,
                    rtol=RTOL,
                    atol=ATOL,
                    msg=lambda m, label=label, name=name: f"{label}: parameter {name} differs\n{m}",
                )


def check_equivalence(job_name: str, plans: list[Plan], steps: int = STEPS) -> None:
    """Train every plan for `job_name` on its world size; compare with the single-process run."""
    assert all(plan.model_name == job_name for plan in plans), [plan.model_name for plan in plans]
    check_plans(plans, steps)


# --------------------------------------------------------------------------- hand plans
# Until a test needs the planner's own choices, plans are written by hand here from the
# zoo models' structure: this is also what a user pinning everything would write.


def _zoo_layers_and_styles(job_name: str) -> tuple[list[str], dict[str, dict]]:
    """The model's layers and tensor-parallel sites as the trace finds them (what a user
    pinning everything would copy from `autoplan show`)."""
    from autoplan.analysis.trace import trace_model

    job = build(job_name, batch_size=1, device="meta")
    traced = trace_model(job.module, job.example_inputs)
    return traced.layers, {path: site.model_dump(exclude_none=True) for path, site in traced.tp_sites.items()}


def hand_plan(
    job_name: str,
    world_size: int,
    *,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    zero_stage: int = 0,
    recompute: str = "none",
    sequence_parallel: bool = False,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    micro_batch_size: int | None = None,
) -> Plan:
    """A Plan written by hand: repeated blocks split evenly over the pp ranks and each rank's
    over its virtual stages (`layout_stages`), the layers before the blocks on the first stage
    and after them on the last."""
    from autoplan.schema.parallel import even_counts, layout_stages
    from autoplan.schema.plan import LayerChoice, Prediction, StagePlan, TPSite

    assert dp * tp * pp == world_size
    layers, styles = _zoo_layers_and_styles(job_name)
    blocks = [name for name in layers if name.startswith(("blocks.", "layers."))]
    head = layers[: layers.index(blocks[0])]
    tail = layers[layers.index(blocks[-1]) + 1 :]
    layout = layout_stages(blocks, even_counts(len(blocks), pp), virtual_stages, head, tail)
    stages = [StagePlan(index=index, pp_rank=index % pp, layers=names) for index, names in enumerate(layout)]
    stage_of = {name: stage.index for stage in stages for name in stage.layers}
    micro_batch_size = micro_batch_size or max(1, GLOBAL_BATCH // (dp * max(pp, 1) * 2))
    if not sequence_parallel:
        styles = {k: v for k, v in styles.items() if v["style"] not in SEQUENCE_PARALLEL_STYLES}
    tied = [["tok_emb.weight", "lm_head.weight"]] if job_name.startswith("gpt") else []
    return Plan(
        model_name=job_name,
        mesh={"dp": dp, "pp": pp, "tp": tp},
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=micro_batch_size,
        num_micro_batches=GLOBAL_BATCH // (dp * micro_batch_size),
        schedule=schedule,
        virtual_stages=virtual_stages,
        zero_stage=zero_stage,
        sequence_parallel=sequence_parallel,
        stages=stages,
        layers=[LayerChoice(name=n, recompute=recompute if n in blocks else "none", stage=stage_of[n]) for n in layers],
        tp_styles={k: TPSite(**v) for k, v in styles.items()} if tp > 1 else {},
        tied_parameters=tied,
        predicted=Prediction(step_time_s=0.0, peak_memory_bytes=0.0),
        cluster=ClusterSpec.local(world_size=world_size),
        model_fingerprint="",
    )
