"""The profile file `autoplan profile` writes: per-layer times measured on a real device,
keyed by layer signature and device kind (measured by `autoplan.measure.profile_store`,
applied to a plan by `autoplan.planner.measured`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from autoplan.schema.cluster import write_atomically
from autoplan.schema.plan import read_json_model

PROFILE_VERSION = 1
LOSS_SUFFIX = "+loss"
"""Appended to the last layer's signature when the loss was measured with it."""


class MicroBatchMeasurement(BaseModel):
    """One distinct layer at one micro-batch size."""

    model_config = ConfigDict(extra="forbid")

    fwd_s: float = Field(ge=0)
    """Median forward seconds of the whole micro-batch."""
    bwd_s: float = Field(ge=0)
    """Median backward seconds of the whole micro-batch."""
    saved_bytes: float = Field(ge=0)
    """Bytes autograd kept for backward (recompute "none"), the whole micro-batch, at `compute_dtype`."""


class LayerEntry(BaseModel):
    """The measurements of one layer signature."""

    model_config = ConfigDict(extra="forbid")

    example_layer: str
    """The first layer with this signature in the measured model, e.g. "blocks.0"."""
    num_layers: int = Field(default=1, ge=1)
    """Layers of the measured model that share it."""
    micro_batches: dict[int, MicroBatchMeasurement]
    """Micro-batch size (sequences) -> measurement."""


class ProfileFile(BaseModel):
    """What `autoplan profile` writes."""

    model_config = ConfigDict(extra="forbid")

    version: int = PROFILE_VERSION
    model_name: str
    input_shape: list[int]
    """Shape of one sequence of the first model input (the signatures depend on it)."""
    device_kind: Literal["cpu", "cuda"]
    device_name: str
    """torch.cuda.get_device_name(), or "cpu"."""
    compute_dtype: str
    """Dtype the floating tensors ran in."""
    num_threads: int
    """torch.get_num_threads() while measuring (1 on CPU: one thread per local rank)."""
    concurrent_ranks: int = Field(default=1, ge=1)
    """Processes computing at once while measuring on a CPU: 1 (alone) since layers are measured
    alone; more in files of earlier versions, measured beside busy peers
    (`autoplan.planner.measured.profile_stretch` reads it)."""
    repeats: int
    """Timed rounds per measurement (after one warm-up); times are their medians."""
    torch_version: str
    created: str
    """UTC date and time of the measurement, ISO 8601."""
    entries: dict[str, LayerEntry]
    """Layer signature (with `LOSS_SUFFIX` for the last layer with its loss) -> measurements."""

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the file whole or not at all."""
        write_atomically(Path(path), self.model_dump_json(indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ProfileFile:
        """Read a file written by `to_json`; a missing or corrupt file raises ValueError naming it."""
        return read_json_model(cls, path, "profile", PROFILE_VERSION)
