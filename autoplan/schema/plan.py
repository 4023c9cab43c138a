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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autoplan.schema.cluster import ClusterSpec, condensed, write_atomically
from autoplan.schema.constraints import FLOAT8, LOSSY_DTYPES, Recompute
from autoplan.schema.parallel import ParallelConfig

PLAN_VERSION = 1
Model = TypeVar("Model", bound=BaseModel)

TPStyle = Literal[
    "colwise",
    "rowwise",
    "vocab_embedding",
    "vocab_output",
    "sequence_parallel",
    "colwise_input",
    "sequence_parallel_entry",
    "sequence_parallel_exit",
]
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
    activation_dtype: str | None = None
    """Dtype the layer stores its saved activations in for backward (quantized on save,
    dequantized on unpack; float8_e4m3fn with a per-tensor scale); None or the plan's
    `activation_dtype`: as computed, exact."""
    matmul_dtype: str | None = None
    """Dtype the layer's Linear layers multiply in (float8_e4m3fn: torchao float8 training);
    None or the plan's `param_dtype`: as computed."""
    precision_saved_bytes: float = 0.0
    """Activation bytes per micro-batch these dtypes save against the exact ones (same recompute)."""
    precision_saved_s: float = 0.0
    """Seconds per micro-batch these dtypes save against the exact ones (negative: the casts cost more)."""
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
    step_time_interval_s: tuple[float, float] | None = None
    """(low, high) seconds where the true step time lies given the calibration residuals of the
    device kind (autoplan.costmodels.uncertainty); None in plans written before intervals."""
    peak_memory_upper_bytes: float | None = None
    """Upper bound on the worst rank's true peak, bytes: peak_memory_bytes * (1 + the residuals'
    memory margin). The planner calls a plan feasible only when this fits the memory cap."""
    uncertainty_source: str = ""
    """Which residuals the interval and the bound come from."""


class Candidate(ParallelConfig):
    """A runner-up plan in short form, and why it lost."""

    recompute: str
    """The repeated blocks' recompute options, e.g. "none" or "selective+full"."""
    step_time_s: float | None
    """None: no schedule or placement of this configuration fits (see `why`)."""
    peak_memory_bytes: float | None
    why: str = ""


class Plan(ParallelConfig):
    """A complete, runnable parallel training configuration: a ParallelConfig (mesh, batch
    split, schedule, ZeRO, sequence parallelism, dtypes) and where every layer runs."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    version: int = PLAN_VERSION
    model_name: str = "model"
    """Zoo name or `path/file.py:factory` the plan was made for (what `autoplan run` builds)."""
    seq_len: int | None = None
    """Tokens per sequence the plan was made for (None: not recorded, or not a sequence model)."""
    input_sources: dict[str, str] = Field(default_factory=dict)
    """Where global_batch_size and seq_len came from: a flag, a default (which), the example inputs."""
    global_batch_size: int
    """micro_batch_size * num_micro_batches * dp sequences per step."""
    activation_dtype: str = "float32"
    """Dtype activations are computed in (param_dtype); a layer may store them narrower."""
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

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        """Refuse a plan no backend could run, with one line naming the field and the arithmetic."""
        problem = plan_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, whole or not at all."""
        write_atomically(Path(path), self.model_dump_json(indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by `to_json`; a missing or corrupt file raises ValueError."""
        return read_json_model(cls, path, "plan", PLAN_VERSION)

    def stages_of_rank(self, pp_rank: int) -> list[StagePlan]:
        """The stages pipeline rank `pp_rank` runs (several with interleaving)."""
        return [stage for stage in self.stages if stage.pp_rank == pp_rank]

    def recompute_of(self) -> dict[str, str]:
        """Layer name -> recompute option."""
        return {layer.name: layer.recompute for layer in self.layers}

    def activation_storage_of(self) -> dict[str, str]:
        """Layer name -> storage dtype, for the layers that store activations narrower than computed."""
        return {
            layer.name: layer.activation_dtype
            for layer in self.layers
            if layer.activation_dtype not in (None, self.activation_dtype)
        }

    def matmul_dtype_of(self) -> dict[str, str]:
        """Layer name -> matmul dtype, for the layers that multiply in another dtype than param_dtype."""
        return {
            layer.name: layer.matmul_dtype
            for layer in self.layers
            if layer.matmul_dtype not in (None, self.param_dtype)
        }


def plan_problem(plan: Plan) -> str | None:
    """What makes `plan` inconsistent (None: nothing): the mesh against the cluster, the batch
    arithmetic, the stages against the layers, tp against what it divides.

        >>> plan_problem(Plan.model_construct(version=1, mesh={"dp": 2, "pp": 1, "tp": 1}))  # doctest: +SKIP
    """
    if plan.version != PLAN_VERSION:
        return f"version {plan.version} is unknown; this autoplan reads plan version {PLAN_VERSION}"
    if sorted(plan.mesh) != ["dp", "pp", "tp"] or any(v < 1 for v in plan.mesh.values()):
        return f"mesh {plan.mesh} must give dp, pp and tp, each >= 1"
    dp, pp, tp = plan.mesh["dp"], plan.mesh["pp"], plan.mesh["tp"]
    if dp * pp * tp != plan.cluster.world_size:
        return (
            f"mesh dp({dp}) * pp({pp}) * tp({tp}) = {dp * pp * tp} != cluster world_size "
            f"{plan.cluster.world_size} ({plan.cluster.num_nodes} nodes x {plan.cluster.devices_per_node})"
        )
    for name in ("global_batch_size", "micro_batch_size", "num_micro_batches", "virtual_stages"):
        if getattr(plan, name) < 1:
            return f"{name} must be >= 1, got {getattr(plan, name)}"
    if plan.seq_len is not None and plan.seq_len < 1:
        return f"seq_len must be >= 1, got {plan.seq_len}"
    if plan.micro_batch_size * plan.num_micro_batches * dp != plan.global_batch_size:
        return (
            f"global_batch_size {plan.global_batch_size} != micro_batch_size({plan.micro_batch_size}) * "
            f"num_micro_batches({plan.num_micro_batches}) * dp({dp}) = "
            f"{plan.micro_batch_size * plan.num_micro_batches * dp}"
        )
    if not 0 <= plan.zero_stage <= 3:
        return f"zero_stage must be 0, 1, 2 or 3, got {plan.zero_stage}"
    return _stage_problem(plan, pp) or _tp_problem(plan, tp) or _precision_problem(plan)


def _stage_problem(plan: Plan, pp: int) -> str | None:
    if len(plan.stages) != pp * plan.virtual_stages:
        return (
            f"stages: {len(plan.stages)} given, pp({pp}) * virtual_stages({plan.virtual_stages}) = "
            f"{pp * plan.virtual_stages} expected"
        )
    for index, stage in enumerate(plan.stages):
        if stage.index != index or stage.pp_rank != index % pp:
            return (
                f"stages[{index}] has index {stage.index} and pp_rank {stage.pp_rank}; expected index {index} "
                f"on pp_rank {index % pp}"
            )
        if not stage.layers:
            return f"stages[{index}] holds no layers"
    on_stages = [name for stage in plan.stages for name in stage.layers]
    if on_stages != [layer.name for layer in plan.layers]:
        return "stages' layers, in order, are not the plan's layers: each layer on exactly one stage, in model order"
    stage_of = {name: stage.index for stage in plan.stages for name in stage.layers}
    wrong = next((layer for layer in plan.layers if layer.stage != stage_of[layer.name]), None)
    if wrong is not None:
        return f"layers: {wrong.name!r} says stage {wrong.stage} but stages[{stage_of[wrong.name]}] holds it"
    return None


def _tp_problem(plan: Plan, tp: int) -> str | None:
    for key, value in plan.tp_divide_attrs.items():
        if value % tp:
            return f"tp({tp}) does not divide {key} = {value}"
    return None


def _precision_problem(plan: Plan) -> str | None:
    """A layer storing activations in a dtype no backend runs, or narrower while recomputing."""
    for name, dtype in plan.activation_storage_of().items():
        layer = next(layer for layer in plan.layers if layer.name == name)
        if dtype not in LOSSY_DTYPES:
            return f"layers: {name!r} activation_dtype {dtype!r} is not one of {list(LOSSY_DTYPES)}"
        if layer.recompute != "none":
            return (
                f"layers: {name!r} stores activations in {dtype} and recomputes ({layer.recompute!r}): "
                f"narrower storage runs only with recompute 'none'"
            )
    for name, dtype in plan.matmul_dtype_of().items():
        if dtype != FLOAT8:
            return f"layers: {name!r} matmul_dtype {dtype!r}: matmuls run in param_dtype or {FLOAT8}"
    return None


def read_json_model(model: type[Model], path: str | os.PathLike, what: str, version: int) -> Model:
    """Read a `model` written as JSON (a plan, a profile) whose "version" must be `version`.
    A missing file, bad JSON, another version or a field that does not validate raises a
    one-line ValueError naming the `what` file: "plan file 'p.json' is not a valid plan: ..."."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {str(path)!r} " + ("is a folder" if path.is_dir() else "does not exist"))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {error}") from None
    found = data.get("version") if isinstance(data, dict) else None
    if found != version:
        raise ValueError(f"{what} file {str(path)!r} has version {found!r}; this autoplan reads version {version}")
    try:
        return model.model_validate(data)
    except ValueError as error:  # pydantic.ValidationError -> one short line
        raise ValueError(f"{what} file {str(path)!r} is not a valid {what}: {condensed(error)[:300]}") from None
