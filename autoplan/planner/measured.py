"""Measured layer times in a plan: a profile file's entries applied to a model's profile.

>>> applied, summary = apply_profile(profile, ProfileFile.from_json("p.json"),
...                                  ClusterSpec.local(2).device, source="p.json")  # doctest: +SKIP
"""

from __future__ import annotations

import os

from autoplan.schema.cluster import ClusterSpec, DeviceSpec
from autoplan.schema.constraints import dtype_name
from autoplan.schema.profile import LayerProfile, ModelProfile
from autoplan.schema.profile_file import LOSS_SUFFIX, ProfileFile


def match_layers(profile: ModelProfile, profile_file: ProfileFile) -> list[str | None]:
    """The file key of each layer of `profile`, None where the file has no entry for it.

    The last layer takes the entry measured with the loss when there is one."""
    keys = []
    for index, layer in enumerate(profile.layers):
        candidates = [layer.signature + LOSS_SUFFIX] if index == len(profile.layers) - 1 else []
        candidates.append(layer.signature)
        keys.append(next((key for key in candidates if key in profile_file.entries), None))
    return keys


def ranks_per_core(cluster: ClusterSpec) -> float:
    """How many ranks of `cluster` share one core of this machine (at least 1): a CPU profile
    is measured in one thread, and a `local` cluster with more ranks than cores gives each
    rank cores / ranks of one (as `costmodels.devices.local_cluster_fields` assumes).

    >>> ranks_per_core(ClusterSpec.preset("dgx-h100"))
    1.0
    """
    if cluster.device.kind != "cpu":
        return 1.0
    return max(1.0, cluster.devices_per_node / (os.cpu_count() or 1))


def apply_profile(
    profile: ModelProfile,
    profile_file: ProfileFile,
    device: DeviceSpec | str,
    *,
    compute_dtype: str | None = None,
    source: str = "profile",
    ranks_per_core: float = 1.0,
) -> tuple[ModelProfile, str]:
    """`profile` with the measured times of `profile_file` on every layer whose signature it
    holds, and one line saying what was applied (or why nothing was).

    `device` is the cluster's DeviceSpec (matched by kind: a "cuda" file applies to every
    CUDA preset) or a device kind or name. A file measured in another dtype than the plan's
    `compute_dtype` is not applied. `source` names the file in the Plan's cost sources.
    Measured times are stretched by `ranks_per_core` (see the function of that name) over the
    ranks per core they were measured at (`concurrent_ranks`; 1 for a local:N profile used on local:N).

        >>> applied, summary = apply_profile(profile, ProfileFile.from_json("p.json"),
        ...                                  ClusterSpec.local(2).device, source="p.json")  # doctest: +SKIP
        >>> summary                                                                          # doctest: +SKIP
        'p.json: measured on cpu for 9/9 layers'
    """
    kind = device.kind if isinstance(device, DeviceSpec) else device
    measured_on = profile_file.device_kind + (
        "" if profile_file.device_name == profile_file.device_kind else f" ({profile_file.device_name})"
    )
    if kind not in (profile_file.device_kind, profile_file.device_name):
        return profile, f"{source}: not used: measured on {measured_on}, the plan's devices are {kind}"
    if compute_dtype is not None and dtype_name(compute_dtype) != profile_file.compute_dtype:
        return profile, (
            f"{source}: not used: measured in {profile_file.compute_dtype}, the plan computes in "
            f"{compute_dtype} (profile with --dtype {compute_dtype}, or pin "
            f"param_dtype={profile_file.compute_dtype})"
        )
    keys = match_layers(profile, profile_file)
    if not any(keys):
        return profile, (
            f"{source}: not used: no layer's signature is in it (measured for {profile_file.model_name} "
            f"with one sequence of shape {profile_file.input_shape}: same --seq-len?)"
        )
    measured_sharing = (
        max(1.0, profile_file.concurrent_ranks / (os.cpu_count() or 1)) if profile_file.device_kind == "cpu" else 1.0
    )
    stretch = ranks_per_core / measured_sharing
    layers = [
        layer if key is None else _with_measurements(layer, profile_file, key, source, stretch)
        for layer, key in zip(profile.layers, keys)
    ]
    found = sum(key is not None for key in keys)
    stretched = (
        f", times x{stretch:.3g} ({ranks_per_core:.3g} ranks per core, measured at {measured_sharing:.3g})"
        if stretch != 1
        else ""
    )
    return (
        profile.model_copy(update={"layers": layers}),
        f"{source}: measured on {profile_file.device_name} for {found}/{len(keys)} layers{stretched}",
    )


def _with_measurements(
    layer: LayerProfile, profile_file: ProfileFile, key: str, source: str, stretch: float
) -> LayerProfile:
    by_mbs = {b: (m.fwd_s * stretch, m.bwd_s * stretch) for b, m in profile_file.entries[key].micro_batches.items()}
    smallest = min(by_mbs)
    return layer.model_copy(
        update=dict(
            measured_fwd_s=by_mbs[smallest][0] / smallest,
            measured_bwd_s=by_mbs[smallest][1] / smallest,
            measured_device=profile_file.device_kind,
            measured_by_mbs=by_mbs,
            measured_source=f"{profile_file.device_name} ({source})",
        )
    )
