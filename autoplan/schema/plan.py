"""The Plan: pure data, the only thing that crosses from planning to running.

A Plan is made by `autoplan.plan` (or the CLI), saved as JSON, inspected with
`autoplan show`, and executed by `autoplan.backends` on every rank.

    >>> plan = Plan.from_json("plan.json")          # doctest: +SKIP
    >>> plan.mesh, plan.predicted.step_time_s       # doctest: +SKIP
    ({'dp': 8, 'pp': 4, 'tp': 4}, 1.93)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from autoplan.schema.cluster import ClusterSpec, write_atomically
from autoplan.schema.constraints import Recompute, Schedule

PLAN_VERSION = 1
Model = TypeVar("Model", bound=BaseModel)

TPStyle = Literal["colwise", "rowwise", "vocab_embedding", "vocab_output", "sequence_parallel",
                  "colwise_input", "sequence_parallel_entry", "sequence_parallel_exit"]
SEQUENCE_PARALLEL_STYLES = ("sequence_parallel", "sequence_parallel_entry", "sequence_parallel_exit")
"""Sites that exist only when the plan runs sequence parallelism."""
INPUT_STYLES = ("colwise_input", "sequence_parallel_entry", "sequence_parallel_exit")
"""Sites that split nothing themselves: they lay out one input of the module."""


class TPSite(BaseModel):
    """How one module is split across the `tp` axis."""

    model_config = ConfigDict(extra="forbid")

    style: TPStyle
    """colwise / rowwise Linear (nn.Linear or GPT-2's transposed Conv1D), vocab-split
    Embedding or output head, a position-wise module (norm, dropout) that runs
    sequence-parallel; or an input layout: `colwise_input` on the parent of a group of
    colwise Linears reading one tensor (replicated once for the group: one all-gather with
    sequence parallelism, one backward all-reduce), `sequence_parallel_entry` on the first
    layer whose input the residual stream is split along the sequence at, and
    `sequence_parallel_exit` on the last, whose output is gathered again."""
    fused_sizes: list[int] | None = None
    """For a colwise Linear whose output packs several tensors (fused q|k|v): the
    output-feature size of each part, so each part is split separately."""
    input_key: int | str | None = None
    """For layout styles: the argument of the module's forward holding the tensor, a position
    (0 = first) or a keyword name (Hugging Face calls `self_attn(hidden_states=...)`); for the
    exit, the position of the stream in the layer's output."""
    num_positional: int | None = None
    """For layout styles: how many positional arguments the module is called with (for the
    exit: how many outputs it returns)."""


class StagePlan(BaseModel):
    """One pipeline stage: consecutive layers, run by pipeline rank `pp_rank`."""

    model_config = ConfigDict(extra="forbid")

    index: int
    """Stage index in model order (0 .. pp * virtual_stages - 1)."""
    pp_rank: int
    """Pipeline rank that runs it: index % pp."""
    layers: list[str]
    """Layer names (module paths) in order."""
    predicted_time_s: float = 0.0
    """Forward + backward time of one micro-batch on this stage."""
    predicted_memory_bytes: float = 0.0
    """Peak memory of the pipeline rank holding this stage (same for its virtual stages)."""


class LayerChoice(BaseModel):
    """Per-layer decisions."""

    model_config = ConfigDict(extra="forbid")

    name: str
    recompute: Recompute = "none"
    stage: int = 0
    time_source: str | None = None
    """Where the layer's time comes from: "measured on <device> (<profile file>)" or
    "estimated (roofline)" (None in plans written before profiles existed)."""


class Prediction(BaseModel):
    """What the cost model predicts for one plan."""

    model_config = ConfigDict(extra="forbid")

    step_time_s: float
    """Seconds per optimizer step (one global batch)."""
    peak_memory_bytes: float
    """Worst rank, bytes."""
    breakdown: dict[str, float] = Field(default_factory=dict)
    """Named terms: time terms end in `_s`, memory terms in `_bytes`."""
    tokens_per_s: float | None = None
    mfu: float | None = None
    """Model FLOPs utilisation: model FLOPs / (step time * world size * peak)."""


class Candidate(BaseModel):
    """A runner-up plan in short form, and why it lost."""

    model_config = ConfigDict(extra="forbid")

    mesh: dict[str, int]
    micro_batch_size: int
    schedule: str
    virtual_stages: int = 1
    zero_stage: int
    recompute: str
    sequence_parallel: bool
    step_time_s: float | None
    peak_memory_bytes: float | None
    why: str = ""


class Plan(BaseModel):
    """A complete, runnable parallel training configuration."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    model_name: str = "model"
    """Zoo name or `path/file.py:factory` the plan was made for (what `autoplan run` builds)."""
    seq_len: int | None = None
    """Sequence length the plan was made for (None: the model's default)."""
    mesh: dict[str, int]
    """{"dp": .., "pp": .., "tp": ..}; the product is the world size."""
    global_batch_size: int
    micro_batch_size: int
    """Sequences per micro-batch per data-parallel rank."""
    num_micro_batches: int
    """global_batch_size / (dp * micro_batch_size)."""
    schedule: Schedule = "1f1b"
    virtual_stages: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    param_dtype: str = "float32"
    grad_reduce_dtype: str = "float32"
    activation_dtype: str = "float32"
    stages: list[StagePlan]
    """pp * virtual_stages stages; stage i runs on pipeline rank i % pp."""
    layers: list[LayerChoice]
    tp_styles: dict[str, TPSite] = Field(default_factory=dict)
    """Module path -> how it is split over `tp` (empty when tp == 1)."""
    tp_divide_attrs: dict[str, int] = Field(default_factory=dict)
    """"module.path.attr" -> value: integer attributes (head counts, widths) the backend
    divides by tp so the local module computes with local shapes."""
    tied_parameters: list[list[str]] = Field(default_factory=list)
    """Groups of parameter names that share one tensor (e.g. tied embeddings)."""
    predicted: Prediction
    runners_up: list[Candidate] = Field(default_factory=list)
    model_fingerprint: str = ""
    cluster_fingerprint: str = ""
    cluster: ClusterSpec
    measured_sources: dict[str, str] = Field(default_factory=dict)
    """Which inputs were measured and which estimated, one line each, e.g.
    {"layer_time": "estimated (roofline) for 1/9 layers (tok_emb); measured on cpu (p.json) for
    8/9 layers (pos_emb .. lm_head)", "memory": "estimated", "profile_file": "p.json: measured
    on cpu for 8/9 layers"}; per layer in `layers[i].time_source`."""
    solver: dict[str, float | str] = Field(default_factory=dict)
    """Solver statistics: name, wall time, number of MILPs solved."""

    @property
    def world_size(self) -> int:
        return self.mesh["dp"] * self.mesh["pp"] * self.mesh["tp"]

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, whole or not at all."""
        write_atomically(Path(path), self.model_dump_json(indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by `to_json`; a missing or corrupt file raises ValueError."""
        return read_json_model(cls, path, "plan", PLAN_VERSION)

    def stages_of_rank(self, pp_rank: int) -> list[StagePlan]:
        """The stages pipeline rank `pp_rank` runs (several with interleaving)."""
        return [stage for stage in self.stages if stage.pp_rank == pp_rank]

    def recompute_of(self) -> dict[str, str]:
        """Layer name -> recompute option."""
        return {layer.name: layer.recompute for layer in self.layers}


def read_json_model(model: type[Model], path: str | os.PathLike, what: str, version: int) -> Model:
    """Read a `model` written as JSON (a plan, a profile) whose "version" must be `version`.
    A missing file, bad JSON, another version or a field that does not validate raises a
    one-line ValueError naming the `what` file: "plan file 'p.json' is not a valid plan: ..."."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {error}") from None
    found = data.get("version") if isinstance(data, dict) else None
    if found != version:
        raise ValueError(f"{what} file {str(path)!r} has version {found!r}; this autoplan reads version {version}")
    try:
        return model.model_validate(data)
    except Exception as error:  # pydantic.ValidationError -> one short line
        raise ValueError(f"{what} file {str(path)!r} is not a valid {what}: {' '.join(str(error).split())[:300]}") \
            from None
