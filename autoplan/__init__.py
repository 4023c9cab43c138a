"""autoplan: plan and run the fastest parallel training of a PyTorch model that fits.

    >>> import autoplan
    >>> cluster = autoplan.ClusterSpec.preset("dgx-a100-80gb", num_nodes=16)
    >>> plan = autoplan.plan(model, cluster, example_inputs=(tokens,))   # doctest: +SKIP
    >>> print(autoplan.explain(plan))                                    # doctest: +SKIP
"""
from autoplan import zoo
from autoplan.cluster import ClusterSpec, DeviceSpec, LinkSpec
from autoplan.constraints import Constraints
from autoplan.errors import AutoplanError, InfeasibleError, TraceError
from autoplan.plan import Plan

__all__ = ["ClusterSpec", "DeviceSpec", "LinkSpec", "Constraints", "Plan", "plan", "parallelize", "explain", "zoo",
           "AutoplanError", "InfeasibleError", "TraceError"]
__version__ = "0.1.0"


# The planner (PuLP) and the runner (torch.distributed) load on first use. These are
# real functions, not a module __getattr__: importing the submodule `autoplan.plan`
# (the Plan schema) would otherwise shadow the function `autoplan.plan`.
def plan(model, cluster, example_inputs, loss_fn=None, constraints=None, objective="throughput", model_name=None,
         *, profile_file=None):
    from autoplan import api

    return api.plan(model, cluster, example_inputs, loss_fn=loss_fn, constraints=constraints,
                    objective=objective, model_name=model_name, profile_file=profile_file)


def explain(plan: Plan) -> str:
    from autoplan import api

    return api.explain(plan)


def parallelize(model, cluster, example_inputs=None, loss_fn=None, plan=None, model_name=None):
    from autoplan import distributed

    return distributed.parallelize(model, cluster, example_inputs, loss_fn=loss_fn, plan=plan, model_name=model_name)


plan.__doc__ = "Plan `model` on `cluster`; see autoplan.api.plan."
explain.__doc__ = "The full report `autoplan show` prints; see autoplan.api.explain."
parallelize.__doc__ = "Plan (unless given a Plan) and apply it on this rank; see autoplan.distributed.parallelize."
