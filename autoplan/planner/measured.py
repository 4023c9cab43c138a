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


def profile_stretch(profile_file: ProfileFile, cluster: ClusterSpec) -> float:
    """How many times longer a layer takes on a rank of `cluster` than `profile_file` measured it:
    1 on GPUs, and for a CPU profile measured under this cluster's own load (`concurrent_ranks`
    = its ranks); otherwise the cluster's `shared_core_slowdown` (calibrated: a model step on
    every rank at once against one alone) over the sharing the profile was measured at (1 alone,
    ranks / cores with busy peers). A profile measured alone is the steady one: on this 2-core VM
    two alone profiles of gpt-small-demo agreed within ~10% per layer, two under local:4's load
    differed by up to 3x for a layer and size (the scheduler's slices land unevenly).

    >>> alone = ProfileFile.model_construct(device_kind="cpu", concurrent_ranks=1)
    >>> local = ClusterSpec.local(4).model_copy(update={"device": ClusterSpec.local(4).device.model_copy(
    ...     update={"shared_core_slowdown": 2.2})})
    >>> profile_stretch(alone, local), profile_stretch(alone.model_copy(update={"concurrent_ranks": 4}), local)
    (2.2, 1.0)
    """
    if cluster.device.kind != "cpu" or profile_file.device_kind != "cpu":
        return 1.0
    if profile_file.concurrent_ranks == cluster.devices_per_node:
        return 1.0
    measured_sharing = max(1.0, profile_file.concurrent_ranks / (os.cpu_count() or 1))
    return cluster.device.shared_core_slowdown / measured_sharing


def apply_profile(
    profile: ModelProfile,
    profile_file: ProfileFile,
    device: DeviceSpec | str,
    *,
    compute_dtype: str | None = None,
    source: str = "profile",
    stretch: float = 1.0,
) -> tuple[ModelProfile, str]:
    """`profile` with the measured times of `profile_file` on every layer whose signature it
    holds, and one line saying what was applied (or why nothing was).

    `device` is the cluster's DeviceSpec (matched by kind: a "cuda" file applies to every
    CUDA preset) or a device kind or name. A file measured in another dtype than the plan's
    `compute_dtype` is not applied. `source` names the file in the Plan's cost sources.
    Measured times are multiplied by `stretch` (`profile_stretch` of the file and the cluster:
    a CPU profile measured alone, used for ranks that share cores).

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
    layers = [
        layer if key is None else _with_measurements(layer, profile_file, key, source, stretch)
        for layer, key in zip(profile.layers, keys)
    ]
    found = sum(key is not None for key in keys)
    stretched = f", times x{stretch:.3g} (ranks sharing cores)" if stretch != 1 else ""
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
