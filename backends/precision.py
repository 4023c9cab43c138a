"""Mixed precision: the plan's dtype names -> FSDP2's `MixedPrecisionPolicy`.

Every ZeRO stage runs through FSDP2's machinery (`fully_shard`, or `replicate`, which
is FSDP2 with a replicate-only mesh), so one policy serves them all: parameters are
cast to `param_dtype` for forward/backward, gradients are reduced in `reduce_dtype`,
and the optimizer keeps float32 master weights.

    >>> mixed_precision_policy("bfloat16", "float32").param_dtype
    torch.bfloat16
    >>> mixed_precision_policy("float32", "float32") is None
    True
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def to_dtype(name: str) -> torch.dtype:
    """ "bfloat16" (or "torch.bfloat16") -> torch.bfloat16; ValueError for anything else."""
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def mixed_precision_policy(param_dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy | None:
    """The FSDP2 policy for these dtypes, or None when both are float32 (nothing to cast)."""
    param, reduce = to_dtype(param_dtype), to_dtype(reduce_dtype)
    if param == reduce == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def bfloat16_compress_hook(process_group, bucket):
    """DDP's `bf16_compress_hook` under another name, for ZeRO-0 with bfloat16 gradient
    reduction: each bucket is cast to bfloat16, divided by the group size, all-reduced and
    copied back into the float32 gradients. torch's DDP accepts the original only on NCCL
    (it checks the hook's name); the same arithmetic runs on gloo too. Unannotated: DDP
    compares the `bucket` annotation with dist.GradBucket, which a string never equals."""
    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)
