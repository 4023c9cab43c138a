"""Profile files: per-layer times measured on a real device, keyed by layer signature and device kind.

    >>> from autoplan import zoo
    >>> job = zoo.build("gpt-tiny", batch_size=8, device="meta")
    >>> measured = measure_profile(job.module, job.example_inputs, job.loss_fn, job.targets, device="cpu",
    ...                            micro_batch_sizes=[1, 2], model_name="gpt-tiny")   # doctest: +SKIP
    >>> measured.to_json("gpt-tiny.cpu.json")                                          # doctest: +SKIP
    >>> profile, summary = apply_profile(model_profile, ProfileFile.from_json("gpt-tiny.cpu.json"),
    ...                                  cluster.device, source="gpt-tiny.cpu.json")  # doctest: +SKIP

What is measured. Each distinct layer (one per `signature`: the hash of its op sequence,
shapes and dtypes for ONE sequence, so the 4 blocks of gpt-tiny share one entry) runs
forward and backward on the device present with random weights, once per micro-batch size
b, on inputs of b sequences (`autoplan.analysis.measured_layer.measure_layer`): the median
seconds of the whole micro-batch over `repeats` sweeps and the bytes autograd keeps for backward
(recompute "none"). A sweep times every layer at every size once (after a warm-up round), so
the repeats of one entry lie a whole sweep apart: a slow spell of the machine lengthens one
sweep, which the median drops. Timed back to back instead, as an earlier version did, one
spell could lengthen all repeats of an entry: on this 2-core VM one profile of the custom
model's blocks came out 40-65% slower per sequence than usual at micro-batches 2 and 4 but not
at 8, and the planner took a pipeline of one micro-batch of 8 (predicted 61 ms per step,
measured 120 ms; two micro-batches of 4 measured 66-75 ms in the other runs of
benchmarks/bench_local.py). The loss rides on the last layer, as in the profiler; its entry key carries
`LOSS_SUFFIX`. Floating tensors run in `compute_dtype` (default: bfloat16 on CUDA and float32 on
CPU, the planner's default dtypes), and on CPU in one thread, as each `local` rank runs
(`autoplan.runtime.worker`); the thread count is restored afterwards. The layers run alone: a
`local:N` cluster whose ranks share this machine's cores stretches the times by its calibrated
`device.shared_core_slowdown` when it plans (`autoplan.planner.measured.profile_stretch`).
Measured while N - 1 peer processes kept the other cores busy instead, as an earlier version
did, two profiles of gpt-small-demo on local:4 differed by up to 3x for one layer and size;
alone they agree within ~10%.

How it is used. `apply_profile` fills `LayerProfile.measured_by_mbs` for every layer whose
signature has an entry, when the file's device kind matches the cluster's ("cuda" applies
to every CUDA preset: a profile made on one H100 plans a DGX H100 cluster) and its
compute dtype is the plan's. The cost model then uses the measured seconds instead of the
roofline (`costmodels/compute.py`), and the Plan names per layer which it used.
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn as nn

from autoplan.planner.measured import match_layers
from autoplan.schema.cluster import DeviceSpec
from autoplan.schema.constraints import dtype_name
from autoplan.schema.profile import ModelProfile
from autoplan.schema.profile_file import LOSS_SUFFIX, LayerEntry, MicroBatchMeasurement, ProfileFile

if TYPE_CHECKING:
    from autoplan.analysis.graph import TracedModel

DEFAULT_MICRO_BATCH_CAP = 8
"""`default_micro_batch_sizes` measures powers of two up to this: beyond it the per-sequence
time is flat (a device is full), and each size costs one more run of every layer."""


def default_micro_batch_sizes(global_batch_size: int) -> list[int]:
    """The micro-batch sizes worth measuring: the sizes the solver can pick (divisors of the
    global batch, up to `planner.search_space.MAX_MICRO_BATCH_SIZE`) that are powers of two up to
    `DEFAULT_MICRO_BATCH_CAP`; other sizes are interpolated.

    >>> default_micro_batch_sizes(8), default_micro_batch_sizes(12), default_micro_batch_sizes(3)
    ([1, 2, 4, 8], [1, 2, 4], [1])
    """
    from autoplan.planner.search_space import MAX_MICRO_BATCH_SIZE

    cap = min(DEFAULT_MICRO_BATCH_CAP, MAX_MICRO_BATCH_SIZE, global_batch_size)
    return [b for b in (2**k for k in range(cap.bit_length())) if b <= cap and global_batch_size % b == 0]


def _entry_keys(signatures: list[str], with_loss: bool) -> list[str]:
    """The file key of each layer, in model order."""
    return [*signatures[:-1], signatures[-1] + (LOSS_SUFFIX if with_loss else "")]


def _measure_device(device: str | torch.device | None) -> torch.device:
    """The device to measure on (default: CUDA when available, else CPU), checked to be a
    CPU or an available CUDA device."""
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: profiles are measured on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device 'cuda': no CUDA device here (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); use --device cpu"
        )
    return device


def _check_measure_inputs(
    example_inputs: tuple,
    sizes: list[int],
    micro_batch_sizes: list[int] | tuple[int, ...],
) -> torch.Tensor:
    """`example_inputs[0]`, checked to be batched with enough sequences for the largest of
    the (sorted, distinct) `sizes`."""
    first = example_inputs[0] if example_inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("example_inputs[0] must be a tensor whose dim 0 is the batch")
    if not sizes or sizes[0] < 1:
        raise ValueError(f"micro_batch_sizes must be >= 1, got {list(micro_batch_sizes)}")
    if sizes[-1] > first.shape[0]:
        raise ValueError(
            f"micro-batch size {sizes[-1]} > the {first.shape[0]} sequences of example_inputs[0]; "
            f"give a global batch of at least {sizes[-1]}"
        )
    return first


def _cut_batch(value, b: int):
    """The first `b` sequences of a batched tensor; anything else as it is."""
    return value[:b] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value


def _distinct_layers(
    module: nn.Module, example_inputs: tuple, with_loss: bool
) -> tuple[dict[str, str], dict[str, LayerEntry]]:
    """The layers to measure, traced on one sequence: each entry key with the first layer
    that has it, and an empty LayerEntry per key counting the layers that share it."""
    from autoplan.analysis.trace import trace_model

    one = trace_model(module, tuple(_cut_batch(x, 1) for x in example_inputs))
    keys = _entry_keys([one.signatures[layer] for layer in one.layers], with_loss)
    jobs: dict[str, str] = {}  # key -> the first layer with it
    for layer, key in zip(one.layers, keys):
        jobs.setdefault(key, layer)
    entries = {
        key: LayerEntry(example_layer=layer, num_layers=keys.count(key), micro_batches={})
        for key, layer in jobs.items()
    }
    return jobs, entries


def _measure_entry(
    traced: TracedModel, layer: str, device: torch.device, dtype: str, loss: Callable | None
) -> MicroBatchMeasurement:
    """One layer's forward, backward and saved bytes at the traced micro-batch size: one timed
    round after a warm-up (the sweeps of `measure_profile` give the repeats)."""
    from autoplan.analysis.measured_layer import measure_layer

    result = measure_layer(traced, layer, device, dtype=getattr(torch, dtype), loss=loss, repeats=1)
    return MicroBatchMeasurement(fwd_s=result.forward_s, bwd_s=result.backward_s, saved_bytes=result.saved_bytes)


def _median_measurement(runs: list[MicroBatchMeasurement]) -> MicroBatchMeasurement:
    """The median forward and backward seconds of one entry's sweeps (its saved bytes do not vary).

    >>> runs = [MicroBatchMeasurement(fwd_s=f, bwd_s=2 * f, saved_bytes=8.0) for f in (1.0, 9.0, 2.0)]
    >>> _median_measurement(runs).fwd_s, _median_measurement(runs).bwd_s
    (2.0, 4.0)
    """
    return MicroBatchMeasurement(
        fwd_s=statistics.median(run.fwd_s for run in runs),
        bwd_s=statistics.median(run.bwd_s for run in runs),
        saved_bytes=runs[0].saved_bytes,
    )


def measure_zoo_profile(
    model: str,
    micro_batch_sizes: list[int] | tuple[int, ...],
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device | None = "cpu",
    **options,
) -> ProfileFile:
    """`measure_profile` of the zoo (or `file.py:factory`, `hf:`) model `model`, built on meta
    with `batch_size` sequences (default: the largest micro-batch) and recorded under its name;
    `options` are measure_profile's keywords (dtype, repeats, progress).

        >>> measure_zoo_profile("gpt-tiny", [1, 2]).to_json("gpt-tiny.cpu.json")  # doctest: +SKIP
    """
    from autoplan.zoo import build

    job = build(model, batch_size=batch_size or max(micro_batch_sizes), seq_len=seq_len, device="meta")
    return measure_profile(
        job.module,
        job.example_inputs,
        job.loss_fn,
        job.targets,
        device=device,
        micro_batch_sizes=micro_batch_sizes,
        model_name=model,
        **options,
    )


def measure_profile(
    module: nn.Module,
    example_inputs: tuple,
    loss_fn: Callable | None = None,
    targets: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    micro_batch_sizes: list[int] | tuple[int, ...] = (1,),
    *,
    dtype: str | None = None,
    model_name: str = "model",
    repeats: int = 5,
    progress: bool = True,
) -> ProfileFile:
    """Measure every distinct layer of `module` at each micro-batch size on `device` (default:
    CUDA when available, else CPU). `example_inputs` need at least max(micro_batch_sizes)
    sequences (dim 0); the module may live on meta (weights are made on the device per layer).

        >>> measured = measure_profile(job.module, job.example_inputs, job.loss_fn, job.targets,
        ...                            device="cpu", micro_batch_sizes=[1, 2])   # doctest: +SKIP
        >>> measured.entries[key].micro_batches[2].fwd_s                         # doctest: +SKIP

    """
    from rich.console import Console
    from rich.progress import Progress

    from autoplan.analysis.measured_layer import bind_loss, device_name
    from autoplan.analysis.trace import trace_model

    device = _measure_device(device)
    dtype = dtype_name(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = sorted(set(micro_batch_sizes))
    first = _check_measure_inputs(example_inputs, sizes, micro_batch_sizes)
    jobs, entries = _distinct_layers(module, example_inputs, loss_fn is not None)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each `local` rank runs; restored below
    try:
        measured_threads = torch.get_num_threads()
        traced = {b: trace_model(module, tuple(_cut_batch(x, b) for x in example_inputs)) for b in sizes}
        samples: dict[tuple[str, int], list[MicroBatchMeasurement]] = {(k, b): [] for k in jobs for b in sizes}
        with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task(f"measuring {model_name} on {device.type}", total=repeats * len(sizes) * len(jobs))
            for sweep in range(repeats):  # whole sweeps: a slow spell lengthens one sweep, not one entry
                for b in sizes:
                    for key, layer in jobs.items():
                        bar.update(task, description=f"{layer} at micro-batch {b} (sweep {sweep + 1}/{repeats})")
                        loss = bind_loss(loss_fn, _cut_batch(targets, b), device) if key.endswith(LOSS_SUFFIX) else None
                        samples[key, b].append(_measure_entry(traced[b], layer, device, dtype, loss))
                        bar.advance(task)
        for (key, b), runs in samples.items():
            entries[key].micro_batches[b] = _median_measurement(runs)
    finally:
        torch.set_num_threads(threads)
    return ProfileFile(
        model_name=model_name,
        input_shape=list(_cut_batch(first, 1).shape),
        device_kind=cast(Literal["cpu", "cuda"], device.type),  # pydantic refuses other kinds
        device_name=device_name(device),
        compute_dtype=dtype,
        num_threads=measured_threads,
        repeats=repeats,
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        entries=entries,
    )


def profile_table(profile_file: ProfileFile, profile: ModelProfile, device: DeviceSpec | None):
    """The rich Table `autoplan profile` prints: per distinct layer and micro-batch size, the
    measured times beside the roofline's (ms) for `device` (None: no roofline columns) and
    the measured saved bytes beside the profiler's count (at the file's dtype). `profile`
    is the profiler's, without measurements (else the "roofline" would be the measurement)."""
    from rich.table import Table

    from autoplan.costmodels.compute import DTYPE_BYTES, estimate_layer_time

    by_key = {key: layer for layer, key in zip(profile.layers, match_layers(profile, profile_file)) if key}
    dtype = profile_file.compute_dtype
    table = Table(
        title=f"{profile_file.model_name} on {profile_file.device_name} ({dtype}); "
        f"roofline: {device.name if device else '-'}"
    )
    for column in (
        "signature",
        "layer",
        "mbs",
        "fwd ms",
        "bwd ms",
        "roofline fwd ms",
        "roofline bwd ms",
        "saved",
        "profiled saved",
    ):
        table.add_column(column, justify="left" if column in ("signature", "layer") else "right")
    for key, entry in profile_file.entries.items():
        layer = by_key.get(key)
        shown = entry.example_layer + (f" (x{entry.num_layers})" if entry.num_layers > 1 else "")
        for b, measured in sorted(entry.micro_batches.items()):
            roofline = ("-", "-")
            if layer is not None and device is not None:
                time = estimate_layer_time(
                    layer,
                    device,
                    micro_batch_size=b,
                    tp=1,
                    sequence_parallel=False,
                    recompute="none",
                    compute_dtype=dtype,
                )
                roofline = (f"{time.forward_s * 1e3:.3f}", f"{time.backward_s * 1e3:.3f}")
            profiled = (
                "-" if layer is None else _format_bytes(layer.saved_bytes.get("none", 0.0) * b * DTYPE_BYTES[dtype] / 4)
            )
            table.add_row(
                key[:8] + key[16:],
                shown,
                str(b),
                f"{measured.fwd_s * 1e3:.3f}",
                f"{measured.bwd_s * 1e3:.3f}",
                *roofline,
                _format_bytes(measured.saved_bytes),
                profiled,
            )
    return table


def _format_bytes(count: float) -> str:
    """1234567 -> "1.23 MB" (decimal units, as the rest of autoplan prints)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"
