"""The order the techniques go on a module, in one place: float8 matmuls, tensor parallel,
then recompute and activation storage, then data parallel (torchtitan's order), each logged
as it is applied.

    >>> apply_techniques(model, plan, mesh)                       # doctest: +SKIP
    >>> apply_techniques(stage, plan, mesh, layers=stage_layers)  # a pipeline stage: its layers only  # doctest: +SKIP

Float8 first: it swaps Linear modules (torchtitan's converters run before parallelizing),
and tensor parallelism splits a Float8Linear as any Linear. Tensor parallel next: it swaps
parameters for DTensors and adds hooks that the checkpointed region must replay. Recompute
next, so the checkpoint wraps the TP-split layer. Activation storage beside it, on the
layers that do not recompute (its saved-tensor hooks enclose the layer's forward, TP's
redistributions included). Data parallel last, because FSDP2 groups and shards whatever
parameters (plain or TP DTensors) the layers hold at that point. All work in place and keep
parameter names, which the pipeline stage then recognises as an FSDPModule and drives.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autoplan.backends.activation_storage import apply_activation_storage
from autoplan.backends.data_parallel import apply_data_parallel
from autoplan.backends.float8 import apply_float8_matmuls
from autoplan.backends.recompute import apply_recompute
from autoplan.backends.tensor_parallel import apply_tensor_parallel
from autoplan.schema.plan import Plan

logger = logging.getLogger("autoplan")


def apply_techniques(module: nn.Module, plan: Plan, mesh: DeviceMesh, layers: list[str] | None = None) -> None:
    """Apply the plan's tensor parallelism, recomputation and data parallelism to `module`
    in place. `layers`: the pipeline stage's layers (only their sites and choices apply, and
    data parallelism only when dp > 1); None: the whole model, data parallel always (on one
    dp rank it still casts to the plan's param_dtype), DDP for plain float32 ZeRO-0."""

    def in_stage(path: str) -> bool:
        return layers is None or any(path == layer or path.startswith(layer + ".") for layer in layers)

    float8 = [layer for layer in plan.matmul_dtype_of() if in_stage(layer)]
    if float8:
        logger.info("float8 matmuls on %d Linears of %d layers", len(apply_float8_matmuls(module, float8)), len(float8))
    if plan.mesh["tp"] > 1 or layers is None:
        styles = {path: site for path, site in plan.tp_styles.items() if in_stage(path)}
        divide = {path: value for path, value in plan.tp_divide_attrs.items() if in_stage(path)}
        apply_tensor_parallel(module, mesh["tp"], styles, divide, plan.sequence_parallel)
        if styles and plan.mesh["tp"] > 1:
            logger.info(
                "tensor parallel tp=%d on %d sites%s",
                plan.mesh["tp"],
                len(styles),
                ", sequence parallel" if plan.sequence_parallel else "",
            )
    recompute = {layer: option for layer, option in plan.recompute_of().items() if in_stage(layer)}
    apply_recompute(module, recompute if layers is None else {k: v for k, v in recompute.items() if v != "none"})
    chosen = sorted({option for option in recompute.values() if option != "none"})
    if chosen:
        logger.info(
            "recompute %s on %d layers", "/".join(chosen), sum(option != "none" for option in recompute.values())
        )
    storage = {layer: dtype for layer, dtype in plan.activation_storage_of().items() if in_stage(layer)}
    if storage:
        apply_activation_storage(module, storage)
        logger.info("activations stored in %s on %d layers", "/".join(sorted(set(storage.values()))), len(storage))
    if layers is None or plan.mesh["dp"] > 1:
        apply_data_parallel(
            module,
            mesh["dp"],
            plan.zero_stage,
            [layer.name for layer in plan.layers] if layers is None else layers,
            plan.param_dtype,
            plan.grad_reduce_dtype,
            prefer_ddp=layers is None,
        )
        logger.info(
            "data parallel dp=%d, ZeRO-%d, params %s, gradients reduced in %s",
            plan.mesh["dp"],
            plan.zero_stage,
            plan.param_dtype,
            plan.grad_reduce_dtype,
        )
