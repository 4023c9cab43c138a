"""Pins on any part of a plan. `None` means "the planner chooses".

>>> Constraints(tp=8, pp=4, schedule="1f1b").tp
8
>>> Constraints(param_dtype=torch.bfloat16).param_dtype
'bfloat16'
>>> Constraints(allow_lossy=True).allow_lossy, Constraints(activation_dtype="fp8").activation_dtype
(True, 'float8_e4m3fn')

A layer's option in the planner is its recompute choice, with the dtype its saved activations
are stored in when that is lossier than the compute dtype (`layer_option`):

>>> layer_option("none", "float8_e4m3fn"), split_layer_option("none@float8_e4m3fn").storage
('none@float8_e4m3fn', 'float8_e4m3fn')
>>> split_layer_option(layer_option("full", matmul_dtype="float8_e4m3fn"))
LayerOption(recompute='full', storage=None, matmul='float8_e4m3fn')
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
Recompute = Literal["none", "selective", "full"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
RECOMPUTE_OPTIONS: tuple[str, ...] = ("none", "selective", "full")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Dtypes parameters compute in and gradients are reduced in."""
FLOAT8 = "float8_e4m3fn"
"""The float8 format activations are stored in and matmuls run in (with a per-tensor scale)."""
LOSSY_DTYPES: tuple[str, ...] = (*DTYPES, FLOAT8)
"""Dtypes activations may be stored in and matmuls may run in."""
STORAGE_SEPARATOR = "@"
MATMUL_SEPARATOR = "/"


def dtype_name(value: object, allowed: tuple[str, ...] = DTYPES) -> str:
    """'bfloat16' from torch.bfloat16, 'torch.bfloat16' or 'bf16'; one of `allowed`."""
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp8": FLOAT8,
        "float8": FLOAT8,
    }
    name = str(value).removeprefix("torch.")
    if not isinstance(value, torch.dtype):
        name = aliases.get(name, name)
    if name not in allowed:
        raise ValueError(f"dtype {value!r} is not supported; use one of {list(allowed)}")
    return name


class LayerOption(NamedTuple):
    """A layer's choice in the planner: recompute, and the dtypes it stores activations and
    multiplies in where they differ from the compute dtype (None: the compute dtype)."""

    recompute: str
    storage: str | None = None
    matmul: str | None = None


def layer_option(recompute: str, activation_dtype: str | None = None, matmul_dtype: str | None = None) -> str:
    """The planner's name for a layer's choice: "none", "none@float8_e4m3fn" (activations
    stored in float8 for backward), "full/float8_e4m3fn" (Linears multiply in float8)."""
    stored = recompute if activation_dtype is None else f"{recompute}{STORAGE_SEPARATOR}{activation_dtype}"
    return stored if matmul_dtype is None else f"{stored}{MATMUL_SEPARATOR}{matmul_dtype}"


def split_layer_option(option: str) -> LayerOption:
    """The LayerOption a `layer_option` name stands for."""
    stored, _, matmul = option.partition(MATMUL_SEPARATOR)
    recompute, _, dtype = stored.partition(STORAGE_SEPARATOR)
    return LayerOption(recompute, dtype or None, matmul or None)


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
    """Dtype the repeated blocks store their saved activations in for backward (quantized on
    save, dequantized on unpack; float8_e4m3fn with a per-tensor scale). Narrower than
    param_dtype, it pins every block to recompute "none" with that storage."""
    matmul_dtype: str | None = None
    """Dtype the repeated blocks' Linear layers multiply in: param_dtype, or float8_e4m3fn
    (torchao float8 training; devices whose peak_flops list float8_e4m3fn, run on CUDA sm89+)."""
    allow_lossy: bool = False
    """Whether the planner may choose what is lossier than param_dtype: bfloat16 gradient
    reduction under float32 parameters, bfloat16/float8 activation storage, float8 matmuls.
    A pinned dtype is used whatever this says."""
    max_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    """Share of device memory a plan may use."""

    @field_validator("param_dtype", "grad_reduce_dtype", mode="before")
    @classmethod
    def _dtype(cls, value: object) -> str | None:
        return None if value is None else dtype_name(value)

    @field_validator("activation_dtype", "matmul_dtype", mode="before")
    @classmethod
    def _lossy_dtype(cls, value: object) -> str | None:
        return None if value is None else dtype_name(value, LOSSY_DTYPES)

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
        return {
            k: v
            for k, v in self.model_dump().items()
            if v is not None and k != "max_memory_fraction" and (k != "allow_lossy" or v)
        }
