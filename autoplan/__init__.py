"""autoplan: plan and run the fastest parallel training of a PyTorch model that fits.

    >>> import autoplan
    >>> cluster = autoplan.ClusterSpec.preset("dgx-a100-80gb", num_nodes=16)
    >>> plan = autoplan.plan(model, cluster, example_inputs=(tokens,))   # doctest: +SKIP
    >>> print(autoplan.explain(plan))                                    # doctest: +SKIP
"""
from autoplan.cluster import ClusterSpec, DeviceSpec, LinkSpec
from autoplan.constraints import Constraints
from autoplan.plan import Plan

__all__ = ["ClusterSpec", "DeviceSpec", "LinkSpec", "Constraints", "Plan", "plan", "parallelize", "explain"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The planner and runner import torch.distributed and PuLP; load them on first use.
    if name in ("plan", "explain"):
        from autoplan import api

        return getattr(api, name)
    if name == "parallelize":
        from autoplan.distributed import parallelize

        return parallelize
    raise AttributeError(f"module 'autoplan' has no attribute {name!r}")
