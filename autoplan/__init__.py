"""autoplan: plan and run the fastest parallel training of a PyTorch model that fits.

    >>> import autoplan
    >>> cluster = autoplan.ClusterSpec.preset("dgx-a100-80gb", num_nodes=16)
    >>> plan = autoplan.plan(model, cluster, example_inputs=(tokens,))   # doctest: +SKIP
    >>> print(autoplan.explain(plan))                                    # doctest: +SKIP

Layers, each importing only those before it (tests/unit/test_layering.py):
`schema` (Plan, ClusterSpec, Constraints, the profile schema: pure data) → `analysis`
(trace, profile) → `costmodels` → `planner` (solver, plan, explain) → `backends` (torch.distributed)
→ `runtime` (parallelize, launch, worker) → `measure` (calibrate, profiles, training timing)
→ `bench` → `cli`. The Plan is the only thing planning hands to running.
"""

from autoplan import zoo
from autoplan.errors import AutoplanError, InfeasibleError, TraceError
from autoplan.schema.cluster import ClusterSpec, DeviceSpec, LinkSpec
from autoplan.schema.constraints import Constraints
from autoplan.schema.plan import Plan

__all__ = [
    "ClusterSpec",
    "DeviceSpec",
    "LinkSpec",
    "Constraints",
    "Plan",
    "plan",
    "parallelize",
    "explain",
    "zoo",
    "AutoplanError",
    "InfeasibleError",
    "TraceError",
]
__version__ = "0.1.0"


# The planner (PuLP) and the runner (torch.distributed) load on first use.
def plan(
    model,
    cluster,
    example_inputs,
    loss_fn=None,
    constraints=None,
    objective="throughput",
    model_name=None,
    *,
    profile_file=None,
):
    from autoplan.planner import planning

    return planning.plan(
        model,
        cluster,
        example_inputs,
        loss_fn=loss_fn,
        constraints=constraints,
        objective=objective,
        model_name=model_name,
        profile_file=profile_file,
    )


def explain(plan: Plan) -> str:
    from autoplan.planner import planning

    return planning.explain(plan)


def parallelize(model, cluster, example_inputs=None, loss_fn=None, plan=None, model_name=None, *, seed=0):
    from autoplan.runtime import parallelize as runtime

    return runtime.parallelize(
        model, cluster, example_inputs, loss_fn=loss_fn, plan=plan, model_name=model_name, seed=seed
    )


plan.__doc__ = "Plan `model` on `cluster`; see autoplan.planner.planning.plan."
explain.__doc__ = "The full report `autoplan show` prints; see autoplan.planner.planning.explain."
parallelize.__doc__ = (
    "Plan (unless given a Plan) and apply it on this rank; see autoplan.runtime.parallelize.parallelize."
)
