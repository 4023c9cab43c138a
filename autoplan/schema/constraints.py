"""Pins on any part of a plan. `None` means "the planner chooses".

>>> Constraints(tp=8, pp=4, schedule="1f1b").tp
8
>>> Constraints(param_dtype=torch.bfloat16).param_dtype
'bfloat16'
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
Recompute = Literal["none", "selective", "full"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_OPTIONS: tuple[str, ...] = ("none", "selective", "full")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def dtype_name(value: object) -> str:
    """'bfloat16' from torch.bfloat16, 'torch.bfloat16' or 'bf16'."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    else:
        name = str(value).removeprefix("torch.")
        name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use one of {list(DTYPES)}")
    return name


class Constraints(BaseModel):
    """Pins for the planner; a fully pinned set is evaluated, not searched."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dp: int | None = Field(default=None, ge=1)
    """Data-parallel degree."""
    tp: int | None = Field(default=None, ge=1)
    """Tensor-parallel degree (placed inside a node)."""
    pp: int | None = Field(default=None, ge=1)
    """Pipeline-parallel degree (number of pipeline ranks)."""
    micro_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per micro-batch per data-parallel rank."""
    schedule: Schedule | None = None
    """Pipeline schedule."""
    virtual_stages: int | None = Field(default=None, ge=1)
    """Stages per pipeline rank (interleaved 1F1B only; 1 otherwise)."""
    zero_stage: int | None = Field(default=None, ge=0, le=3)
    """0 replicated, 1 optimizer states sharded, 2 + gradients, 3 + parameters (FSDP)."""
    recompute: Recompute | None = None
    """Activation recomputation applied to every repeated block."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism (only meaningful with tp > 1)."""
    param_dtype: str | None = None
    """Dtype parameters compute in (master weights stay float32)."""
    grad_reduce_dtype: str | None = None
    """Dtype gradients are reduced in across data-parallel ranks."""
    activation_dtype: str | None = None
    """Dtype activations are stored in for backward (quantized storage: a later release)."""
    max_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    """Share of device memory a plan may use."""

    @field_validator("param_dtype", "grad_reduce_dtype", "activation_dtype", mode="before")
    @classmethod
    def _dtype(cls, value: object) -> str | None:
        return None if value is None else dtype_name(value)

    @classmethod
    def parse_fix(cls, text: str) -> Constraints:
        """Parse the CLI's `--fix dp=8,tp=4,schedule=1f1b,sequence_parallel=true`.

        >>> Constraints.parse_fix("dp=2,tp=2,recompute=full").recompute
        'full'
        """
        values: dict[str, Any] = {}  # bool, int, float or str: pydantic checks each against its field
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                raise ValueError(f"--fix item {item!r} must look like field=value")
            if key not in cls.model_fields:
                raise ValueError(f"--fix field {key!r} is unknown; fields: {sorted(cls.model_fields)}")
            raw = raw.strip()
            lowered = raw.lower()
            if lowered in ("true", "false"):
                values[key] = lowered == "true"
            else:
                try:
                    values[key] = int(raw)
                except ValueError:
                    try:
                        values[key] = float(raw)
                    except ValueError:
                        values[key] = raw
        return cls(**values)

    def pinned(self) -> dict[str, object]:
        """The fields that are set, e.g. {"tp": 8}."""
        return {k: v for k, v in self.model_dump().items() if v is not None and k != "max_memory_fraction"}
