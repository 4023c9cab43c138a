"""Describe the machines a plan runs on: devices, how many, and the links between them.

Units (fixed by SPEC.md): bandwidth in GB/s per device, one direction; latency in
microseconds; memory in bytes; compute in FLOP/s.

    >>> cluster = ClusterSpec.preset("dgx-a100-80gb", num_nodes=16)
    >>> cluster.world_size
    128
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float8_e4m3fn")
"""Dtypes `peak_flops` may list; float8_e4m3fn only on devices with float8 tensor cores."""


class DeviceSpec(BaseModel):
    """One accelerator (or one CPU process for `local`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Human name, e.g. "A100-SXM4-80GB"."""
    kind: Literal["cuda", "cpu"] = "cuda"
    """torch device type the plan runs on."""
    memory_bytes: int = Field(gt=0)
    """Usable device memory per device, bytes."""
    memory_bandwidth_gbps: float = Field(gt=0)
    """Device memory bandwidth, GB/s."""
    peak_flops: dict[str, float]
    """Dense peak FLOP/s per dtype name ("float32", "bfloat16", "float16", and "float8_e4m3fn"
    where the device has float8 tensor cores: the planner offers float8 matmuls only there)."""
    matmul_efficiency: float = Field(default=0.7, gt=0, le=1)
    """Share of peak a large matmul achieves (calibration replaces it)."""
    matmul_half_efficiency_flops: float = Field(default=2e9, gt=0)
    """FLOPs per layer and micro-batch at which matmul efficiency is half its large-size
    value (small GEMMs do not fill the device). 2e9 for GPUs: cuBLAS BF16 GEMMs on A100
    reach ~90% of their asymptotic rate above ~1e10 FLOPs per call and a transformer layer
    issues ~6 GEMMs (calibrated on benchmarks/megatron_sc21.py)."""
    attention_efficiency: float | None = Field(default=None, gt=0, le=1)
    """Share of peak a fused attention kernel achieves on the FLOPs it runs (a causal one skips
    about half, `LayerProfile.attention_run_fraction`): softmax and tiling keep it below a
    GEMM's. None: `matmul_efficiency` (CPU ranks, whose calibration fits one rate to a whole
    transformer block)."""
    memory_efficiency: float = Field(default=0.8, gt=0, le=1)
    """Share of memory bandwidth an elementwise kernel achieves (calibrated)."""
    framework_overhead_bytes: int = Field(default=0, ge=0)
    """Memory the framework keeps per device whatever the model (CUDA context, cuBLAS workspace)."""
    allocator_reserve_fraction: float = Field(default=0.0, ge=0, le=1)
    """Memory the caching allocator holds beyond what tensors occupy, as a share of it: blocks
    cached for reuse and split blocks no request fits (fragmentation). What
    `torch.cuda.max_memory_reserved` adds to `max_memory_allocated`; 0 where the peak is
    counted tensor by tensor (CPU ranks, `AllocationTracker`)."""
    adam_bytes_per_param: float = Field(default=28.0, gt=0)
    """Memory traffic of one Adam step per parameter, bytes (plus the compute copy when
    params are not fp32). 28 for a fused kernel (reads master weight, gradient and two
    moments, writes master and moments); PyTorch's multi-tensor Adam on a CPU makes
    several passes and moves more (`autoplan calibrate` measures it)."""
    shared_core_slowdown: float = Field(default=1.0, ge=1)
    """How much slower a rank computes when every rank of the node computes than when it
    runs alone: > 1 where ranks share CPU cores (`local` with more ranks than cores), 1 for
    GPUs. The device's rates are the all-busy ones (`autoplan calibrate` measures it: the
    cores' share, `ranks_per_core`, times the ranks' contention for caches and memory)."""
    ranks_per_core: float = Field(default=1.0, ge=1)
    """Ranks that share one core (`local` with more ranks than cores; 1 for GPUs): a count, not a
    measurement. A rank whose peers wait in a pipeline bubble gets a core of its own and runs
    up to this much faster than all-busy, not `shared_core_slowdown` faster: the ranks still
    running share the caches and memory with it (costmodels/pipeline.py)."""
    tp_dispatch_overhead_us: float = Field(default=0.0, ge=0)
    """Host time DTensor adds per tensor-parallel site (one split Linear, norm or embedding)
    per micro-batch, forward + backward, microseconds: wrapping, sharding propagation and
    redistribution run in Python around every op on a DTensor. 0 on GPUs, where it runs
    ahead of the kernels; a CPU rank pays it in full (`autoplan calibrate` measures it)."""
    dtensor_param_step_us: float = Field(default=0.0, ge=0)
    """Host time the optimizer step adds per parameter tensor that is a DTensor (FSDP2's
    shards, `replicate` beside tensor or pipeline parallelism, tensor-parallel weights),
    microseconds: every op of the step goes through DTensor's dispatch. 0 on GPUs (it runs
    ahead of the kernels); `autoplan calibrate` measures it on CPU ranks."""
    op_overhead_us: float = Field(default=0.0, ge=0)
    """Host time each aten op a layer dispatches costs beyond its arithmetic (eager PyTorch's
    dispatch, autograd bookkeeping, allocation), microseconds, charged per op of the layer's
    forward and backward (`LayerProfile.forward_ops`, `backward_ops`) whatever the batch or
    tensor-parallel split. 0 in every preset: on GPUs it runs ahead of the kernels; on CPU
    ranks `autoplan calibrate` measures it with its host probe (`measure.probes.HOST_PROBE`)."""
    overlaps_communication: bool = True
    """Whether collectives run beside compute (NCCL on CUDA streams). A CPU rank's gloo
    collectives share the cores its compute uses, so on `local` all communication is exposed."""

    @field_validator("peak_flops")
    @classmethod
    def _check_peaks(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DTYPE_NAMES))
        if unknown:
            raise ValueError(f"peak_flops has unknown dtype(s) {unknown}; use {list(DTYPE_NAMES)}")
        if "float32" not in value:
            raise ValueError("peak_flops must give at least 'float32'")
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"peak_flops must be > 0 FLOP/s, got {bad}")
        return value

    def peak_flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`, falling back to float32 where the datasheet gives none."""
        return self.peak_flops.get(dtype, self.peak_flops["float32"])


class LinkSpec(BaseModel):
    """A network link as seen by one device: bandwidth one direction and latency."""

    model_config = ConfigDict(extra="forbid")

    bandwidth_gbps: float = Field(gt=0)
    """GB/s per device, one direction."""
    latency_us: float = Field(ge=0)
    """One-message latency, microseconds."""
    collective_overhead_us: float = Field(default=0.0, ge=0)
    """Fixed cost of each collective call beyond its messages, microseconds:
    on CPU ranks that outnumber the cores, the wait for every peer to be scheduled while
    the others compute (`autoplan calibrate` measures it); 0 for NCCL on GPUs."""
    p2p_overhead_us: float = Field(default=0.0, ge=0)
    """Fixed cost of each pipeline send beyond its message, microseconds: on CPU ranks that
    outnumber the cores, the receiver's wait to be scheduled once the activation arrives
    (`autoplan calibrate` measures it); 0 on GPUs."""
    tree_all_reduce: bool = False
    """Whether an all-reduce over this link pays a tree's latency, 2 ceil(log2 n) messages,
    instead of a ring's 2 (n - 1): NCCL runs all-reduce across nodes on double binary trees
    (NCCL 2.4, "Massively Scale Your Deep Learning Training with NCCL 2.4", NVIDIA 2019),
    whose depth grows as log2 of the nodes, at the ring's bandwidth. True for the GPU
    presets' inter-node links; gloo's all-reduce on CPU ranks is a ring."""


class ClusterSpec(BaseModel):
    """Nodes of identical devices, linked inside a node and across nodes.

    >>> ClusterSpec.preset("dgx-h100", num_nodes=4, inter_node_gbps_per_device=25.0).inter_node.bandwidth_gbps
    25.0
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    """Preset name the spec came from, or "custom"."""
    num_nodes: int
    """Number of nodes (machines)."""
    devices_per_node: int
    """Devices (GPUs, or CPU processes for `local`) per node."""
    device: DeviceSpec
    intra_node: LinkSpec
    """Link between devices of one node (NVLink; shared memory for `local`)."""
    inter_node: LinkSpec
    """Link between nodes (InfiniBand), bandwidth per device."""
    calibrated: bool = False
    """True when the device and link figures were measured by `autoplan calibrate`."""

    @field_validator("num_nodes", "devices_per_node")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @property
    def world_size(self) -> int:
        """num_nodes * devices_per_node."""
        return self.num_nodes * self.devices_per_node

    # ---------------------------------------------------------------- constructors
    @classmethod
    def preset(cls, name: str, num_nodes: int = 1, **overrides) -> ClusterSpec:
        """A datasheet preset; `overrides` replace any field.

        Shortcuts: `inter_node_gbps_per_device`, `intra_node_gbps_per_device`,
        `inter_node_latency_us`, `intra_node_latency_us`, `memory_bytes`,
        `devices_per_node`, and any DeviceSpec field by name.

        >>> ClusterSpec.preset("dgx-a100-80gb", num_nodes=2).world_size
        16
        """
        from autoplan.costmodels.devices import PRESETS, local_cluster_fields

        if name == "local":
            data = local_cluster_fields(world_size=overrides.pop("world_size", 1) * num_nodes)
            data["num_nodes"] = 1
        elif name in PRESETS:
            data = json.loads(json.dumps(PRESETS[name]))
            data["num_nodes"] = num_nodes
        else:
            raise ValueError(f"unknown cluster preset {name!r}; choose one of {sorted(PRESETS) + ['local']}")
        data["name"] = name
        shortcuts = {
            "inter_node_gbps_per_device": ("inter_node", "bandwidth_gbps"),
            "intra_node_gbps_per_device": ("intra_node", "bandwidth_gbps"),
            "inter_node_latency_us": ("inter_node", "latency_us"),
            "intra_node_latency_us": ("intra_node", "latency_us"),
        }
        device_fields = set(DeviceSpec.model_fields)
        for key, value in overrides.items():
            if key in shortcuts:
                section, field = shortcuts[key]
                data[section][field] = value
            elif key in device_fields:
                data["device"][key] = value
            elif key in cls.model_fields:
                data[key] = value
            else:
                raise ValueError(
                    f"unknown override {key!r}; use one of {sorted(shortcuts)}, a DeviceSpec field "
                    f"{sorted(device_fields)} or a ClusterSpec field {sorted(cls.model_fields)}"
                )
        return cls.model_validate(data)

    @classmethod
    def local(cls, world_size: int = 1) -> ClusterSpec:
        """This machine: `world_size` CPU processes talking over gloo.

        >>> ClusterSpec.local(world_size=4).world_size
        4
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        return cls.preset("local", world_size=world_size)

    @classmethod
    def parse(cls, text: str) -> ClusterSpec:
        """Parse the CLI's `--cluster`: "PRESET:NUM_NODES", "local:N" or a file path.

        >>> ClusterSpec.parse("dgx-a100-80gb:16").world_size
        128
        """
        if os.path.exists(text) or text.endswith((".json", ".toml")):
            return cls.from_file(text)
        name, _, count = text.partition(":")
        try:
            number = int(count) if count else 1
        except ValueError:
            raise ValueError(f"--cluster {text!r}: expected PRESET:NUM_NODES, local:N or a file") from None
        if name == "local":
            return cls.local(world_size=number)
        return cls.preset(name, num_nodes=number)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ClusterSpec:
        """Load a cluster from a .json or .toml file (as written by `to_file`)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cluster file {str(path)!r} " + ("is a folder" if path.is_dir() else "does not exist"))
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                if sys.version_info >= (3, 11):
                    import tomllib
                else:
                    import tomli as tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as error:  # json.JSONDecodeError, tomllib.TOMLDecodeError
            raise ValueError(
                f"cluster file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {error}"
            ) from None
        try:
            preset = data.pop("preset", None)
            if preset is not None:  # a short file: a preset plus overrides
                return cls.preset(preset, num_nodes=data.pop("num_nodes", 1), **data)
            return cls.model_validate(data)
        except ValueError as error:
            raise ValueError(f"cluster file {str(path)!r}: {condensed(error)}") from None

    def to_file(self, path: str | os.PathLike) -> None:
        """Write the spec whole (atomically) as .json or .toml."""
        path = Path(path)
        data = self.model_dump()
        if path.suffix == ".toml":
            import tomli_w

            text = tomli_w.dumps(self.model_dump(exclude_none=True))  # TOML has no null: a missing key reads as None
        else:
            text = json.dumps(data, indent=2) + "\n"
        write_atomically(path, text)

    def fingerprint(self) -> str:
        """Short hash of everything a plan's cost depends on."""
        blob = json.dumps(self.model_dump(exclude={"name"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line, e.g. "dgx-a100-80gb: 16 nodes x 8 A100-SXM4-80GB = 128 devices"."""
        return (
            f"{self.name}: {self.num_nodes} node(s) x {self.devices_per_node} {self.device.name} "
            f"= {self.world_size} devices"
        )


def condensed(error: BaseException) -> str:
    """A pydantic ValidationError as `field: reason; ...` on one line (other errors: their message)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            quiet = "got" in message or isinstance(item.get("input"), (dict, list))
            shown = "" if quiet else f" (got {item['input']!r})"
            parts.append(f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {message}{shown}")
        return "; ".join(parts)
    return " ".join(str(error).split())


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp makes 0600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
