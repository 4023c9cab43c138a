"""Precision as planner choices: which dtypes a plan computes, reduces gradients, stores
activations and multiplies in, from the cluster and the Constraints.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> choices = precision_choices(ClusterSpec.preset("dgx-h100"), Constraints(allow_lossy=True))
    >>> choices.param_dtype, choices.storage_dtypes, choices.matmul_dtypes
    ('bfloat16', ('float8_e4m3fn',), ('float8_e4m3fn',))

Exact by default (`Constraints.allow_lossy=False`): parameters compute in bfloat16 (float32
master weights) or float32 on GPUs, searched (`param_dtype_options`), float32 on CPUs (and
bfloat16 with `allow_lossy`), gradients are reduced in the parameters' dtype, activations are stored
in it and matmuls run in it. With `allow_lossy=True`:
  - gradients are reduced in bfloat16: the same plan moves half the bytes and holds smaller
    buffers, so it dominates float32 reduction and is chosen without a search;
  - every repeated block may store its saved activations in a narrower dtype than it
    computes in (bfloat16 under float32, float8_e4m3fn with a per-tensor scale): a per-layer
    alternative to recompute "none" in the MILP, beside "selective" and "full" (memory saved
    against the casts' time, `costmodels.compute.estimate_storage_cast_s`);
  - the repeated blocks' Linear layers may multiply in float8_e4m3fn (torchao's float8
    training) on devices whose `peak_flops` list it (the H100/H200 presets); the instance
    takes it when it makes the block faster (it changes no memory term, so it then dominates).
A pinned dtype is used whatever `allow_lossy` says; one the backend cannot run is refused
here, at planning, with the device and its capability named.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.costmodels.compute import DTYPE_BYTES
from autoplan.errors import AutoplanError
from autoplan.schema.cluster import ClusterSpec
from autoplan.schema.constraints import FLOAT8, Constraints

STORAGE_DTYPES = ("bfloat16", FLOAT8)
"""Activation storage dtypes the planner may choose, each where it is narrower than param_dtype."""


@dataclass(frozen=True)
class PrecisionChoices:
    """The dtypes one solve works with."""

    param_dtype: str
    grad_reduce_dtype: str
    storage_dtypes: tuple[str, ...] = ()
    """Storage dtypes the repeated blocks may use besides their compute dtype."""
    storage_pinned: bool = False
    """Every repeated block stores its activations in `storage_dtypes[0]`."""
    matmul_dtypes: tuple[str, ...] = ()
    """Matmul dtypes the repeated blocks' Linears may use besides param_dtype."""
    matmul_pinned: bool = False


def narrower(dtype: str, than: str) -> bool:
    """Whether `dtype` holds fewer bytes per element than `than`."""
    return DTYPE_BYTES[dtype] < DTYPE_BYTES[than]


def has_float8(cluster: ClusterSpec) -> bool:
    """Whether the cluster's device multiplies in float8 (its peak_flops list float8_e4m3fn)."""
    return cluster.device.kind == "cuda" and FLOAT8 in cluster.device.peak_flops


def param_dtype_options(cluster: ClusterSpec, constraints: Constraints, measured: bool = False) -> list[str]:
    """The parameter dtypes a solve searches, the default first: a pin; else on GPUs bfloat16
    (mixed precision) and float32 (exact, 16 bytes of states a parameter instead of 18, but
    float32 matmuls and activations); on CPUs float32, and bfloat16 with `allow_lossy`.
    A profile with measured layer times (`measured`: taken in one dtype) keeps the default.

    >>> from autoplan.schema.cluster import ClusterSpec
    >>> param_dtype_options(ClusterSpec.local(2), Constraints(allow_lossy=True))
    ['float32', 'bfloat16']
    """
    if constraints.param_dtype is not None:
        return [constraints.param_dtype]
    if cluster.device.kind == "cuda":
        return ["bfloat16"] if measured else ["bfloat16", "float32"]
    return ["float32", "bfloat16"] if constraints.allow_lossy and not measured else ["float32"]


def precision_choices(cluster: ClusterSpec, constraints: Constraints, param: str | None = None) -> PrecisionChoices:
    """The dtypes of a solve with parameters in `param` (default: the first of
    `param_dtype_options`; module docstring); a pinned dtype no backend can run raises."""
    param = param or param_dtype_options(cluster, constraints)[0]
    lossy = constraints.allow_lossy
    grad = constraints.grad_reduce_dtype or ("bfloat16" if lossy and param == "float32" else param)
    storage, storage_pinned = _storage_choices(constraints, param)
    matmul, matmul_pinned = _matmul_choices(cluster, constraints, param)
    return PrecisionChoices(param, grad, storage, storage_pinned, matmul, matmul_pinned)


def _storage_choices(constraints: Constraints, param: str) -> tuple[tuple[str, ...], bool]:
    pinned = constraints.activation_dtype
    if pinned is None:
        return tuple(d for d in STORAGE_DTYPES if narrower(d, param)) if constraints.allow_lossy else (), False
    if pinned == param:
        return (), False
    if pinned not in STORAGE_DTYPES or not narrower(pinned, param):
        raise AutoplanError(
            f"activation_dtype={pinned} cannot store activations computed in param_dtype={param}: "
            f"use {param} (exact) or a narrower one of {[d for d in STORAGE_DTYPES if narrower(d, param)]}"
        )
    if constraints.recompute not in (None, "none"):
        raise AutoplanError(
            f"activation_dtype={pinned} stores what backward reads without recomputing it: it needs "
            f"recompute='none', not recompute={constraints.recompute!r}"
        )
    return (pinned,), True


def _matmul_choices(cluster: ClusterSpec, constraints: Constraints, param: str) -> tuple[tuple[str, ...], bool]:
    pinned = constraints.matmul_dtype
    if pinned is None or pinned == param:
        return ((FLOAT8,) if constraints.allow_lossy and pinned is None and has_float8(cluster) else ()), False
    if pinned != FLOAT8:
        raise AutoplanError(f"matmul_dtype={pinned}: matmuls run in param_dtype={param} or in {FLOAT8}")
    if not has_float8(cluster):
        capability = ", ".join(sorted(cluster.device.peak_flops))
        raise AutoplanError(
            f"matmul_dtype={FLOAT8} needs float8 tensor cores (CUDA sm89+: H100, H200); device "
            f"{cluster.device.name} ({cluster.device.kind}) multiplies in {capability}"
        )
    return (FLOAT8,), True
